"""The data stream: a pure function of (seed, step), split across any world size.

A prepared dataset is a folder (any fsspec URL) of token shards plus `index.json`, written last.
Sample `i` is tokens `[i * seq_len, i * seq_len + seq_len + 1)` of the concatenated shards:
inputs and their shifted targets. Samples do not overlap except for that one target token.

Order. Epoch `e` visits every sample once in the order of a permutation seeded by `(seed, e)`.
Global batch `s` holds the `batch_size` ids at positions `s * batch_size ...` of the endless
sequence epoch 0, epoch 1, ... Rank `r` of `W` takes the contiguous slice
`[r * B // W, (r + 1) * B // W)`: every id of the batch goes to exactly one rank, for any `W`.

After a restart at step `s`, at any world size, the stream continues with global batch `s`:
nothing is repeated or skipped, and there is nothing to restore but `s`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem

from checkpointing.storage import Storage

INDEX = "index.json"
SHARD_TOKENS = 1 << 22


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to download."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file (local path or fsspec URL)."""

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        with fsspec.open(path, "r", encoding="utf-8") as f:
            self._tok = Tokenizer.from_str(f.read())
        self.name = f"hf:{os.path.basename(path)}"
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.int64)


def embedded_corpus() -> str:
    """Python's own pydoc topics (~465 KB of English prose and code), on every install."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


# ---------------------------------------------------------------------------------------------
# Preparation: text -> token shards + index.json
# ---------------------------------------------------------------------------------------------


def _write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Readers never see half a file: local files via rename, object-store puts are atomic."""
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def prepare(
    out: str,
    inputs: Iterable[str] = (),
    tokenizer_path: str | None = None,
    shard_tokens: int = SHARD_TOKENS,
) -> dict:
    """Tokenize `inputs` (text files, any fsspec URL; none: the embedded corpus) into `out`.

    Writes shards first and `index.json` last, so a reader never sees a half-prepared dataset.
    Running it twice with the same inputs writes the same bytes (safe when nodes race to it).
    """
    tok = HFTokenizer(tokenizer_path) if tokenizer_path else ByteTokenizer()
    dtype = np.dtype("<u2") if tok.vocab_size <= 1 << 16 else np.dtype("<u4")
    fs, root = fsspec.core.url_to_fs(out)
    texts: Iterable[str]
    inputs = list(inputs)
    if inputs:
        def read_all() -> Iterator[str]:
            for url in inputs:
                with fsspec.open(url, "r", encoding="utf-8", errors="replace") as f:
                    yield f.read()
        texts = read_all()
    else:
        texts = [embedded_corpus()]

    shards: list[dict] = []
    pending: list[np.ndarray] = []
    pending_len = 0

    def flush(final: bool) -> None:
        nonlocal pending, pending_len
        while pending_len >= shard_tokens or (final and pending_len > 0):
            flat = np.concatenate(pending).astype(dtype)
            chunk, rest = flat[:shard_tokens], flat[shard_tokens:]
            name = f"tokens_{len(shards):05d}.bin"
            _write_atomic(fs, f"{root}/{name}", chunk.tobytes())
            shards.append({"path": name, "tokens": int(chunk.size)})
            pending, pending_len = ([rest] if rest.size else []), int(rest.size)

    separator = tok.encode("\n\n")
    for i, text in enumerate(texts):
        tokens = tok.encode(text)
        pending += [separator, tokens] if i else [tokens]
        pending_len += int(tokens.size) + (int(separator.size) if i else 0)
        flush(final=False)
    flush(final=True)
    if not shards:
        raise ValueError(f"no text found in {inputs or ['the embedded corpus']}")
    index = {
        "version": 1,
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "shards": shards,
        "total_tokens": sum(s["tokens"] for s in shards),
    }
    _write_atomic(fs, f"{root}/{INDEX}", json.dumps(index, indent=1).encode())
    return index


def is_prepared(uri: str) -> bool:
    fs, root = fsspec.core.url_to_fs(uri)
    return fs.exists(f"{root}/{INDEX}")


# ---------------------------------------------------------------------------------------------
# Reading: ranged reads through fsspec with a block cache
# ---------------------------------------------------------------------------------------------


class TokenStore:
    """Random access to the tokens of a prepared dataset; never loads it whole.

    Reads go through `checkpointing.storage.Storage` (the retry layer checkpoints use: transient
    faults are retried for up to `retry_timeout_s`, then a read raises StorageError; missing
    credentials or denied access fail at once) in blocks of `block_bytes`, kept in an LRU cache
    of `cache_blocks`. A missing `index.json` raises FileNotFoundError naming the URI.
    """

    def __init__(self, uri: str, block_bytes: int = 1 << 16, cache_blocks: int = 256,
                 retry_timeout_s: float = 60.0) -> None:
        self.uri = uri
        self.storage = Storage(uri, retry_timeout_s=retry_timeout_s)
        try:
            raw_index = self.storage.read_bytes(INDEX)
            self.index = json.loads(raw_index)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no prepared dataset at {uri!r} (missing {INDEX}); "
                "run `elastic-train data prepare --out URI`"
            ) from None
        self.identity = hashlib.sha256(raw_index).hexdigest()[:16]
        """The dataset's identity: a digest of its index (shard names, sizes, tokenizer), the
        same for a copy of it at another URI."""
        self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        self.vocab_size = int(self.index["vocab_size"])
        self.total_tokens = int(self.index["total_tokens"])
        self._starts = np.cumsum([0] + [s["tokens"] for s in self.index["shards"]])
        self._block_tokens = max(1, block_bytes // self.dtype.itemsize)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_blocks = cache_blocks
        self._lock = threading.Lock()

    def num_samples(self, seq_len: int) -> int:
        return (self.total_tokens - 1) // seq_len

    def _block(self, shard: int, block: int) -> np.ndarray:
        key = (shard, block)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        info = self.index["shards"][shard]
        start = block * self._block_tokens
        end = min(start + self._block_tokens, info["tokens"])
        raw = self.storage.read_bytes(info["path"], start * self.dtype.itemsize,
                                      end * self.dtype.itemsize)
        tokens = np.frombuffer(raw, dtype=self.dtype)
        with self._lock:
            self._cache[key] = tokens
            if len(self._cache) > self._cache_blocks:
                self._cache.popitem(last=False)
        return tokens

    def tokens(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the concatenated shards, across shard borders."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        while filled < length:
            pos = start + filled
            shard = int(np.searchsorted(self._starts, pos, side="right") - 1)
            offset = pos - int(self._starts[shard])
            block, within = divmod(offset, self._block_tokens)
            data = self._block(shard, block)[within:]
            n = min(len(data), length - filled)
            out[filled:filled + n] = data[:n]
            filled += n
        return out

    def sample(self, sample_id: int, seq_len: int) -> np.ndarray:
        return self.tokens(sample_id * seq_len, seq_len + 1)


# ---------------------------------------------------------------------------------------------
# Order: which sample ids make global batch s, and which of them a rank takes
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def global_batch(step: int, batch_size: int, num_samples: int, seed: int) -> list[int]:
    """The sample ids of global batch `step` (0-based): a pure function of its arguments."""
    ids = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, within = divmod(pos, num_samples)
        ids.append(int(_permutation(num_samples, seed, epoch)[within]))
    return ids


def rank_slice(batch_size: int, world_size: int, rank: int) -> slice:
    """Rank `rank`'s contiguous share of a global batch; shares differ by at most one sample."""
    return slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)


def batch_digest(ids: list[int]) -> str:
    return hashlib.sha256(np.asarray(ids, dtype="<i8").tobytes()).hexdigest()[:16]


@dataclass
class Batch:
    step: int
    """0-based index of the global batch (the optimizer step this batch feeds, minus one)."""
    global_ids: list[int]
    inputs: torch.Tensor  # (b, T) this rank's share
    targets: torch.Tensor  # (b, T)


class DataStream:
    """This rank's batches from global step `start_step` on, fetched `prefetch` steps ahead.

    A fetch error (storage down) is raised from `next()` on the step that needed it, never lost.
    """

    def __init__(
        self, store: TokenStore, *, seq_len: int, batch_size: int, seed: int,
        rank: int, world_size: int, start_step: int, prefetch: int = 2,
    ) -> None:
        self.store, self.seq_len, self.batch_size, self.seed = store, seq_len, batch_size, seed
        self.num_samples = store.num_samples(seq_len)
        if self.num_samples < 1:
            raise ValueError(f"dataset {store.uri!r} is shorter than one sample of {seq_len + 1}")
        self.share = rank_slice(batch_size, world_size, rank)
        self._next_step = start_step
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if prefetch > 0:
            self._thread = threading.Thread(
                target=self._produce, args=(start_step,), name="data-prefetch", daemon=True
            )
            self._thread.start()

    def _load(self, step: int) -> Batch:
        ids = global_batch(step, self.batch_size, self.num_samples, self.seed)
        mine = ids[self.share]
        samples = np.stack([self.store.sample(i, self.seq_len) for i in mine])
        tensor = torch.from_numpy(samples)
        return Batch(step, ids, tensor[:, :-1].contiguous(), tensor[:, 1:].contiguous())

    def _produce(self, step: int) -> None:
        while not self._stop.is_set():
            try:
                item: Batch | BaseException = self._load(step)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, not swallowed
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return
            step += 1

    def __iter__(self) -> DataStream:
        return self

    def __next__(self) -> Batch:
        if self._thread is None:
            batch = self._load(self._next_step)
        else:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            batch = item
        self._next_step = batch.step + 1
        return batch

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)


# ---------------------------------------------------------------------------------------------
# CLI: elastic-train data prepare
# ---------------------------------------------------------------------------------------------


def _prepare_command(args: argparse.Namespace) -> int:
    index = prepare(args.out, args.inputs, args.tokenizer, args.shard_tokens)
    print(
        f"prepared {index['total_tokens']:,} tokens ({index['tokenizer']}, vocab "
        f"{index['vocab_size']}) in {len(index['shards'])} shard(s) at {args.out}"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="prepare token shards for training")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser("prepare", help="tokenize text files into shards + index.json at --out")
    p.add_argument("--out", required=True, help="destination URI (s3://, gs://, file://, path)")
    p.add_argument("inputs", nargs="*", help="text files (paths or fsspec URLs); none: embedded")
    p.add_argument(
        "--tokenizer", default=None, help="Hugging Face tokenizers JSON file (default: bytes)",
    )
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokens per shard")
    p.set_defaults(func=_prepare_command)
