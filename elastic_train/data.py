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
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

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
    """UTF-8 bytes as tokens: vocabulary 256, nothing to download. End of text is byte 0 (NUL),
    which text files do not contain."""

    name = "byte"
    vocab_size = 256
    eot = 0

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]


EOT_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
"""End-of-text tokens looked up, in this order, in a Hugging Face tokenizer's vocabulary."""


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file (local path or fsspec URL). Raises ValueError naming
    the file when its vocabulary has none of `EOT_TOKENS`."""

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        with fsspec.open(path, "r", encoding="utf-8") as f:
            self._tok = Tokenizer.from_str(f.read())
        self.name = f"hf:{os.path.basename(path)}"
        self.vocab_size = self._tok.get_vocab_size()
        found = [i for t in EOT_TOKENS if (i := self._tok.token_to_id(t)) is not None]
        if not found:
            raise ValueError(f"tokenizer {path!r} has no end-of-text token; expected one of "
                             f"{', '.join(EOT_TOKENS)}")
        self.eot = found[0]

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Encoded on all cores by the tokenizers library (its own thread pool), in order."""
        return [np.asarray(e.ids, dtype=np.int64) for e in self._tok.encode_batch(texts)]


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


FORMATS = (".txt", ".jsonl", ".parquet")
"""Input files `prepare` reads, by name ending: a whole text file is one document; a JSON Lines
file has one document per line (in `field`); a Parquet file one per row (in column `field`)."""


def read_documents(url: str, field: str = "text") -> Iterator[str]:
    """The documents of one input file, in file order. Raises ValueError naming the file (and
    line) for an unknown format, a line that is not JSON or lacks `field`, or a Parquet file
    without column `field`; ImportError naming the extra when pyarrow is not installed."""
    if url.endswith(".jsonl"):
        with fsspec.open(url, "r", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)[field]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{url}:{number} is not a JSON object with a string field "
                                     f"{field!r}") from None
                if not isinstance(value, str):
                    raise ValueError(f"{url}:{number}: field {field!r} is a "
                                     f"{type(value).__name__}, expected a string")
                yield value
    elif url.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {url} needs pyarrow: pip install "
                              "'elastic-train[parquet]'") from None
        with fsspec.open(url, "rb") as f:
            table = pq.ParquetFile(f)
            if field not in table.schema_arrow.names:
                raise ValueError(f"{url} has no column {field!r}; its columns: "
                                 f"{', '.join(table.schema_arrow.names)}")
            for batch in table.iter_batches(columns=[field]):
                yield from (v for v in batch.column(0).to_pylist() if v is not None)
    elif url.endswith(".txt") or "." not in os.path.basename(url):
        with fsspec.open(url, "r", encoding="utf-8", errors="replace") as f:
            yield f.read()
    else:
        raise ValueError(f"{url}: unknown input format; expected a file ending in "
                         f"{', '.join(FORMATS)}")


def _batches(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def prepare(
    out: str,
    inputs: Iterable[str] = (),
    tokenizer_path: str | None = None,
    shard_tokens: int = SHARD_TOKENS,
    field: str = "text",
    progress: bool = False,
) -> dict:
    """Tokenize the documents of `inputs` (see `FORMATS`; any fsspec URL; none: the embedded
    corpus) into `out`, each document followed by the tokenizer's end-of-text token.

    Documents are encoded in batches (in parallel where the tokenizer can), in input order, so
    the same inputs give the same shards, byte for byte (safe when nodes race to it). Writes
    shards first and `index.json` last: a reader never sees a half-prepared dataset. `progress`
    shows a bar of documents on stderr when it is a terminal. Raises ValueError when there is no
    text, or as `read_documents` does for a bad input; nothing is left that a reader would take
    as prepared.
    """
    from tqdm import tqdm

    tok = HFTokenizer(tokenizer_path) if tokenizer_path else ByteTokenizer()
    dtype = np.dtype("<u2") if tok.vocab_size <= 1 << 16 else np.dtype("<u4")
    fs, root = fsspec.core.url_to_fs(out)
    inputs = list(inputs)
    docs: Iterable[str] = (
        (d for url in inputs for d in read_documents(url, field)) if inputs
        else [embedded_corpus()]
    )

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

    eot = np.asarray([tok.eot], dtype=np.int64)
    # disable=None: tqdm draws only on a terminal, so logs and pipes get no bar lines.
    with tqdm(desc="tokenizing", unit=" docs", disable=None if progress else True,
              leave=False) as bar:
        for batch in _batches(docs, 256):
            for tokens in tok.encode_batch(batch):
                pending += [tokens, eot]
                pending_len += int(tokens.size) + 1
            bar.update(len(batch))
            flush(final=False)
    flush(final=True)
    if not shards:
        raise ValueError(f"no text found in {inputs or ['the embedded corpus']}")
    index = {
        "version": 2,
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "eot": int(tok.eot),
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


class TokenDataset:
    """A prepared token dataset as a map-style dataset: item `i` is (inputs, targets) of sample
    `i`, each `seq_len` tokens, the targets shifted by one."""

    def __init__(self, store: TokenStore, seq_len: int) -> None:
        self.store, self.seq_len = store, seq_len

    def __len__(self) -> int:
        return self.store.num_samples(self.seq_len)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.from_numpy(self.store.sample(index, self.seq_len))
        return tokens[:-1], tokens[1:]

    @property
    def identity(self) -> str:
        return self.store.identity


def identity_of(dataset: object) -> str:
    """What names a dataset across resumes: its own `identity` when it has one (prepared token
    shards: a digest of their index), else its class and length: a spec's dataset that changes
    its items without changing either is not seen."""
    own = getattr(dataset, "identity", None)
    if isinstance(own, str):
        return own
    kind = type(dataset)
    return f"{kind.__module__}.{kind.__qualname__}:{len(dataset)}"  # type: ignore[arg-type]


def micro_batch_count(batch_size: int, world_size: int, micro_batch: int) -> int:
    """Micro-batches every rank runs per step: enough for the largest share, the same on every
    rank (each one's forward and backward are collectives). 0 means one: the whole share."""
    if micro_batch <= 0:
        return 1
    return -(-batch_size // (world_size * micro_batch))


def micro_slices(share: int, count: int) -> list[slice]:
    """`share` items cut into `count` consecutive micro-batches whose sizes differ by at most
    one, the longer first. A share shorter than `count` leaves empty slices at the end."""
    q, r = divmod(share, count)
    return [slice(i * q + min(i, r), (i + 1) * q + min(i + 1, r)) for i in range(count)]


@dataclass
class Batch:
    step: int
    """0-based index of the global batch (the optimizer step this batch feeds, minus one)."""
    global_ids: list[int]
    items: list[Any]
    """This rank's share: the dataset's items, not yet collated."""


class DataStream:
    """This rank's share of global batch `start_step`, then of each next one, fetched `prefetch`
    steps ahead. Items come from any map-style `dataset` (len and getitem), chosen by the pure
    function `global_batch(step, ...)`, so the stream after a restart at any world size is the
    one an uninterrupted run would have seen.

    A fetch error (storage down) is raised from `next()` on the step that needed it, never lost.
    """

    def __init__(
        self, dataset: Any, *, batch_size: int, seed: int,
        rank: int, world_size: int, start_step: int, prefetch: int = 2,
    ) -> None:
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.num_samples = len(dataset)
        if self.num_samples < 1:
            raise ValueError(f"dataset {dataset!r} has no samples")
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
        return Batch(step, ids, [self.dataset[i] for i in ids[self.share]])

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
    try:
        index = prepare(args.out, args.inputs, args.tokenizer, args.shard_tokens, args.field,
                        progress=True)
    except (ValueError, ImportError, FileNotFoundError) as e:
        print(f"elastic-train: error: {e}", file=sys.stderr)
        return 2
    print(
        f"prepared {index['total_tokens']:,} tokens ({index['tokenizer']}, vocab "
        f"{index['vocab_size']}) in {len(index['shards'])} shard(s) at {args.out}"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="prepare token shards for training")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser("prepare", help="tokenize documents into shards + index.json at --out")
    p.add_argument("--out", required=True, help="destination URI (s3://, gs://, file://, path)")
    p.add_argument("inputs", nargs="*",
                   help="files ending in .txt (one document each), .jsonl (one per line) or "
                        ".parquet (one per row); paths or fsspec URLs; none: the embedded corpus")
    p.add_argument("--field", default="text",
                   help="the JSON field or Parquet column holding the text (default: text)")
    p.add_argument(
        "--tokenizer", default=None, help="Hugging Face tokenizers JSON file (default: bytes)",
    )
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokens per shard")
    p.set_defaults(func=_prepare_command)
