"""The data stream: every sample of a batch goes to exactly one rank at any world size, and a
stream resumed at step s is the uninterrupted stream from s on."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from elastic_train import data


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> data.TokenStore:
    out = tmp_path_factory.mktemp("corpus")
    # Small shards so that samples straddle shard borders.
    data.prepare(str(out), shard_tokens=50_000)
    return data.TokenStore(f"file://{out}")


@pytest.mark.parametrize("batch_size", [8, 12, 13, 16])
@pytest.mark.parametrize("world_size", range(1, 9))
def test_every_sample_of_a_batch_is_taken_by_exactly_one_rank(batch_size: int, world_size: int):
    if batch_size < world_size:
        pytest.skip("batch smaller than world: refused by config validation")
    ids = data.global_batch(7, batch_size, num_samples=1000, seed=3)
    taken = [i for r in range(world_size) for i in ids[data.rank_slice(batch_size, world_size, r)]]
    assert taken == ids
    shares = [len(ids[data.rank_slice(batch_size, world_size, r)]) for r in range(world_size)]
    assert max(shares) - min(shares) <= 1 and min(shares) >= 1


def test_an_epoch_visits_every_sample_once_then_reshuffles():
    n, b = 100, 10
    epoch0 = [i for s in range(10) for i in data.global_batch(s, b, n, seed=0)]
    epoch1 = [i for s in range(10, 20) for i in data.global_batch(s, b, n, seed=0)]
    assert sorted(epoch0) == list(range(n)) == sorted(epoch1)
    assert epoch0 != epoch1


def test_a_batch_straddling_an_epoch_border_ends_one_epoch_and_starts_the_next():
    ids = data.global_batch(3, batch_size=30, num_samples=100, seed=1)  # positions 90..119
    epoch0 = [i for s in range(9) for i in data.global_batch(s, 10, 100, seed=1)]
    assert len(ids) == 30
    assert sorted(epoch0 + ids[:10]) == list(range(100))
    assert ids[10:] == [i for s in range(10, 12) for i in data.global_batch(s, 10, 100, seed=1)]


def test_order_depends_on_seed_only():
    assert data.global_batch(5, 16, 500, seed=0) == data.global_batch(5, 16, 500, seed=0)
    assert data.global_batch(5, 16, 500, seed=0) != data.global_batch(5, 16, 500, seed=1)


@pytest.mark.parametrize("world_before,world_after", [(1, 3), (3, 2), (2, 2)])
def test_stream_resumed_at_step_s_equals_the_uninterrupted_stream(
    corpus: data.TokenStore, world_before: int, world_after: int
):
    def global_view(world: int, start: int, n: int) -> list[tuple[str, np.ndarray]]:
        samples = data.TokenDataset(corpus, seq_len=64)
        streams = [data.DataStream(samples, batch_size=10, seed=0, rank=r,
                                   world_size=world, start_step=start, prefetch=2)
                   for r in range(world)]
        out = []
        for _ in range(n):
            parts = [next(s) for s in streams]
            inputs = np.stack([x.numpy() for p in parts for x, _ in p.items])
            out.append((data.batch_digest(parts[0].global_ids), inputs))
        for s in streams:
            s.close()
        return out

    uninterrupted = global_view(world_before, 0, 12)
    resumed = global_view(world_before, 0, 5) + global_view(world_after, 5, 7)
    assert [d for d, _ in resumed] == [d for d, _ in uninterrupted]
    for (_, a), (_, b) in zip(resumed, uninterrupted, strict=True):
        np.testing.assert_array_equal(a, b)


def test_samples_are_contiguous_text_across_shard_borders(corpus: data.TokenStore):
    border = corpus.index["shards"][0]["tokens"]
    straddling = border // 64  # sample whose window crosses from shard 0 into shard 1
    sample = corpus.sample(straddling, 64)
    text = data.embedded_corpus().encode()
    start = straddling * 64
    assert bytes(sample.astype(np.uint8)) == text[start:start + 65]
    assert len(corpus.index["shards"]) == -(-len(text) // 50_000)


def test_targets_are_inputs_shifted_by_one(corpus: data.TokenStore):
    stream = data.DataStream(data.TokenDataset(corpus, seq_len=32), batch_size=4, seed=0,
                             rank=0, world_size=1, start_step=0, prefetch=0)
    for inputs, targets in next(stream).items:
        assert inputs.shape == targets.shape == (32,)
        assert (inputs[1:] == targets[:-1]).all()


class Squares:
    """A map-style dataset that is not text: item i is (i, i * i)."""

    def __len__(self) -> int:
        return 37

    def __getitem__(self, i: int) -> tuple[int, int]:
        return i, i * i


@pytest.mark.parametrize("world_before,world_after", [(1, 3), (4, 2)])
def test_a_map_style_dataset_resumes_exactly_at_another_world_size(
    world_before: int, world_after: int
):
    def items(world: int, start: int, n: int) -> list[list[tuple[int, int]]]:
        streams = [data.DataStream(Squares(), batch_size=8, seed=3, rank=r, world_size=world,
                                   start_step=start, prefetch=1) for r in range(world)]
        out = [[item for s in streams for item in next(s).items] for _ in range(n)]
        for s in streams:
            s.close()
        return out

    uninterrupted = items(world_before, 0, 10)
    assert items(world_before, 0, 4) + items(world_after, 4, 6) == uninterrupted
    seen = [i for batch in uninterrupted[:5] for i, _ in batch]
    assert sorted(seen[:37]) == list(range(37))  # one epoch visits every item once


@pytest.mark.parametrize("batch,world,micro", [(16, 1, 4), (16, 2, 4), (16, 3, 4), (10, 4, 2),
                                               (5, 2, 1), (16, 2, 0), (7, 7, 3)])
def test_micro_batches_are_the_same_count_on_every_rank_and_never_exceed_micro_batch(
    batch: int, world: int, micro: int
):
    count = data.micro_batch_count(batch, world, micro)
    for rank in range(world):
        share = data.rank_slice(batch, world, rank)
        parts = data.micro_slices(share.stop - share.start, count)
        sizes = [p.stop - p.start for p in parts]
        assert len(parts) == count
        assert sum(sizes) == share.stop - share.start
        assert sizes == sorted(sizes, reverse=True) and sizes[0] - sizes[-1] <= 1
        if micro:
            assert max(sizes) <= micro


def test_shrinking_the_world_lengthens_the_step_not_the_micro_batch():
    counts = [data.micro_batch_count(64, world, 4) for world in (8, 6, 4, 2, 1)]
    assert counts == [2, 3, 4, 8, 16]


def test_reader_fetches_ranges_not_the_whole_dataset(tmp_path):
    data.prepare(str(tmp_path), shard_tokens=200_000)
    store = data.TokenStore(str(tmp_path), block_bytes=4096, cache_blocks=4)
    for i in range(0, 3000, 97):
        store.sample(i, 128)
    cached = sum(b.nbytes for b in store._cache.values())
    assert cached <= 4 * 4096 < store.total_tokens * 2


def test_missing_dataset_names_the_uri(tmp_path):
    with pytest.raises(FileNotFoundError, match="no prepared dataset at"):
        data.TokenStore(str(tmp_path / "nothing"))


def test_prepare_with_a_hugging_face_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([data.embedded_corpus()[:100_000]],
                            trainers.BpeTrainer(vocab_size=500,
                                                special_tokens=["[UNK]", "</s>"]))
    tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog " * 200)
    index = data.prepare(str(tmp_path / "out"), [str(tmp_path / "a.txt")],
                         tokenizer_path=str(tmp_path / "tok.json"))
    assert index["vocab_size"] == tok.get_vocab_size()
    assert index["eot"] == tok.token_to_id("</s>")
    store = data.TokenStore(str(tmp_path / "out"))
    expected = tok.encode("the quick brown fox").ids
    assert store.tokens(0, len(expected)).tolist() == expected
    assert store.tokens(store.total_tokens - 1, 1).tolist() == [index["eot"]]


DOCS = ["first document\nwith two lines", "second, ünïcödé", "", "third"]


def write_inputs(tmp_path) -> dict[str, str]:
    """The same documents as .txt files, one .jsonl and one .parquet (two row groups)."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    paths = {"txt": [], "jsonl": str(tmp_path / "docs.jsonl"),
             "parquet": str(tmp_path / "docs.parquet")}
    for i, doc in enumerate(DOCS):
        (tmp_path / f"{i}.txt").write_text(doc, encoding="utf-8")
        paths["txt"].append(str(tmp_path / f"{i}.txt"))
    with open(paths["jsonl"], "w", encoding="utf-8") as f:
        for doc in DOCS:
            f.write(json.dumps({"id": 1, "body": doc}) + "\n")
    pq.write_table(pa.table({"body": DOCS, "n": list(range(len(DOCS)))}), paths["parquet"],
                   row_group_size=2)
    return paths


def shard_bytes(out) -> bytes:
    store = data.TokenStore(str(out))
    return store.tokens(0, store.total_tokens).tobytes()


def test_txt_jsonl_and_parquet_of_the_same_documents_give_the_same_shards(tmp_path):
    paths = write_inputs(tmp_path)
    data.prepare(str(tmp_path / "txt"), paths["txt"])
    data.prepare(str(tmp_path / "jsonl"), [paths["jsonl"]], field="body")
    data.prepare(str(tmp_path / "parquet"), [paths["parquet"]], field="body", progress=True)
    expected = b"".join(d.encode() + b"\0" for d in DOCS)
    store = data.TokenStore(str(tmp_path / "txt"))
    assert bytes(store.tokens(0, store.total_tokens).astype(np.uint8)) == expected
    assert shard_bytes(tmp_path / "jsonl") == shard_bytes(tmp_path / "txt")
    assert shard_bytes(tmp_path / "parquet") == shard_bytes(tmp_path / "txt")


def test_preparing_the_same_inputs_twice_writes_the_same_files(tmp_path):
    paths = write_inputs(tmp_path)
    inputs = [paths["jsonl"], paths["parquet"], *paths["txt"]]
    for out in ("a", "b"):
        data.prepare(str(tmp_path / out), inputs * 50, shard_tokens=1000, field="body")
    a, b = sorted((tmp_path / "a").iterdir()), sorted((tmp_path / "b").iterdir())
    assert [p.name for p in a] == [p.name for p in b] and len(a) > 2
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name,content,field,message", [
    ("bad.jsonl", '{"text": "ok"}\nnot json\n', "text", r"bad.jsonl:2 is not a JSON object"),
    ("bad.jsonl", '{"body": "ok"}\n', "text", r"bad.jsonl:1 is not a JSON object .* 'text'"),
    ("bad.jsonl", '{"text": 3}\n', "text", r"field 'text' is a int, expected a string"),
    ("docs.csv", "a,b\n", "text", r"docs.csv: unknown input format; expected .*\.jsonl"),
])
def test_a_bad_input_is_named_in_one_line(tmp_path, name, content, field, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        data.prepare(str(tmp_path / "out"), [str(tmp_path / name)], field=field)
    assert not data.is_prepared(str(tmp_path / "out"))


def test_a_parquet_file_without_the_column_names_its_columns(tmp_path):
    paths = write_inputs(tmp_path)
    with pytest.raises(ValueError, match=r"has no column 'text'; its columns: body, n"):
        data.prepare(str(tmp_path / "out"), [paths["parquet"]])


def test_the_prepare_command_names_a_bad_input_in_one_line_and_exits_2(tmp_path):
    (tmp_path / "docs.jsonl").write_text('{"body": "x"}\n')
    proc = subprocess.run([sys.executable, "-m", "elastic_train.cli", "data", "prepare",
                           "--out", str(tmp_path / "out"), str(tmp_path / "docs.jsonl")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"elastic-train: error: {tmp_path / 'docs.jsonl'}:1 is not a "
                                   "JSON object with a string field 'text'")
