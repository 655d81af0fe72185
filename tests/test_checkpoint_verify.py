"""Loads check what they read against COMMIT.json and fall back to the commit before; permanent
storage errors fail at once; a start-of-run probe catches a missing bucket."""

from __future__ import annotations

import os
import threading
import zlib

import pytest
import torch
from ckpt_workers import Trainer, assert_same, build_model, full_state, train_steps

from checkpointing import (
    CheckpointConfig,
    CheckpointManager,
    ModelOptimizerState,
    StorageError,
)
from checkpointing.commit import CRC_CHUNK_BYTES, FileRecord, read_commit, step_dir
from checkpointing.dcp_io import _chunk_aligned
from checkpointing.errors import CorruptCheckpoint
from checkpointing.events import FALLBACK
from checkpointing.retry import is_transient
from checkpointing.storage import Storage

# Every storage operation below may retry for 10 minutes: a test that finishes within this
# timeout shows a corrupt file was not retried as "transient".
pytestmark = pytest.mark.timeout(90)
PATIENT = CheckpointConfig(retry_timeout_s=600.0)


def save_two_steps(uri: str, options: dict | None = None) -> dict[int, dict]:
    """Commit steps 1 and 2 of one run; returns the full state at each."""
    torch.manual_seed(0)
    model = build_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    expected = {}
    with CheckpointManager(uri, CheckpointConfig(keep=5), storage_options=options) as manager:
        for step in (1, 2):
            train_steps(model, opt, step, 1)
            expected[step] = full_state(model, opt)
            manager.save(step, {"app": ModelOptimizerState(model, opt), "trainer": Trainer(step)})
        manager.wait()
    return expected


def load_newest(uri: str, options: dict | None = None, step: int | None = None
                ) -> tuple[int | None, dict, list[dict], CheckpointManager]:
    model = build_model(7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, opt, 1, 1)
    events: list[dict] = []
    with CheckpointManager(uri, PATIENT, on_event=events.append,
                           storage_options=options) as manager:
        loaded = manager.load({"app": ModelOptimizerState(model, opt), "trainer": Trainer()},
                              step=step)
    return loaded, full_state(model, opt), events, manager


def damage(storage: Storage, step: int, how: str, name: str = "__0_0.distcp") -> str:
    rel = f"{step_dir(step)}/{name}"
    data = bytearray(storage.read_bytes(rel))
    if how == "truncated":
        data = data[: len(data) // 2]
    else:  # one flipped bit, same size
        data[len(data) // 3] ^= 0x10
    storage.write_bytes(rel, bytes(data))
    return storage.url_of(rel)


@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
@pytest.mark.parametrize("name", ["__0_0.distcp", ".metadata"])
def test_a_damaged_newest_commit_falls_back_to_the_one_before(run_store, how, name):
    uri, options = run_store
    expected = save_two_steps(uri, options)
    bad = damage(Storage(uri, options), 2, how, name)
    loaded, got, events, manager = load_newest(uri, options)
    assert loaded == 1
    assert_same(expected[1], got)
    (fallback,) = [e for e in events if e["event"] == FALLBACK]
    assert (fallback["step"], fallback["to_step"], fallback["file"]) == (2, 1, bad)
    assert manager.metrics["fallbacks"] == 1


def test_an_intact_commit_loads_without_fallback(run_store):
    uri, options = run_store
    expected = save_two_steps(uri, options)
    loaded, got, events, manager = load_newest(uri, options)
    assert loaded == 2 and not events and manager.metrics["fallbacks"] == 0
    assert_same(expected[2], got)


def test_a_damaged_step_asked_for_by_number_raises_naming_the_file(tmp_path):
    uri = f"file://{tmp_path}/run"
    save_two_steps(uri)
    bad = damage(Storage(uri), 2, "bit-flipped")
    with pytest.raises(CorruptCheckpoint, match=f"{bad}: crc32"):
        load_newest(uri, step=2)


def test_when_every_commit_is_damaged_the_load_fails_instead_of_starting_over(tmp_path):
    uri = f"file://{tmp_path}/run"
    save_two_steps(uri)
    storage = Storage(uri)
    damage(storage, 1, "truncated")
    damage(storage, 2, "truncated")
    with pytest.raises(CorruptCheckpoint, match="step_00000001/__0_0.distcp: missing|bytes"):
        load_newest(uri)


def test_chunk_checksums_catch_a_flip_in_a_partly_read_file():
    data = bytes(range(256)) * (CRC_CHUNK_BYTES * 2 // 256 + 100)
    record = FileRecord.of(data)
    assert len(record.chunks) == 3
    start, end = _chunk_aligned(CRC_CHUNK_BYTES + 10, CRC_CHUNK_BYTES + 20, record)
    assert (start, end) == (CRC_CHUNK_BYTES, 2 * CRC_CHUNK_BYTES)
    record.check("f", data[start:end], start)
    flipped = bytearray(data[start:end])
    flipped[5] ^= 1
    with pytest.raises(CorruptCheckpoint, match="f: chunk 1"):
        record.check("f", bytes(flipped), start)
    # The tail chunk ends at the end of the file, not on a chunk border.
    record.check("f", data[2 * CRC_CHUNK_BYTES:], 2 * CRC_CHUNK_BYTES)


@pytest.mark.parametrize("size", [0, 1, CRC_CHUNK_BYTES - 1, CRC_CHUNK_BYTES,
                                  CRC_CHUNK_BYTES + 1, 2 * CRC_CHUNK_BYTES + 12345])
def test_the_whole_files_crc_combined_from_its_chunks_is_the_files_crc(size):
    """One pass over the bytes: the whole file's CRC-32 is combined from its chunks' CRCs, and is
    what any CRC-32 of the file says (a reader checks the whole file against it)."""
    data = os.urandom(size)
    record = FileRecord.of(data)
    assert record.crc32 == zlib.crc32(data) & 0xFFFFFFFF
    record.check("f", data)


def test_commit_json_records_chunk_checksums_and_the_writer_epoch(tmp_path):
    uri = f"file://{tmp_path}/run"
    save_two_steps(uri)
    info = read_commit(Storage(uri), 2)
    assert info is not None and info.writer_epoch == 1
    assert all(len(r.chunks) == -(-r.size // CRC_CHUNK_BYTES) for r in info.files.values())


# -- errors no retry can fix ---------------------------------------------------------------------
def test_missing_credentials_denied_access_and_no_such_bucket_are_permanent():
    from botocore.exceptions import NoCredentialsError

    assert not is_transient(NoCredentialsError())
    assert not is_transient(PermissionError("AccessDenied"))
    assert not is_transient(FileNotFoundError("NoSuchBucket"))
    assert not is_transient(OSError("Forbidden: b/k\nno access"))
    assert not is_transient(CorruptCheckpoint("x: crc32"))
    assert is_transient(ConnectionError("short read"))
    assert is_transient(OSError("503 SlowDown"))


def test_a_missing_bucket_fails_the_probe_at_once_naming_the_uri(s3):
    uri = "s3://no-such-bucket-here/run"
    with CheckpointManager(uri, PATIENT, storage_options=s3.storage_options) as manager:
        with pytest.raises(StorageError, match="s3://no-such-bucket-here/run"):
            manager.check_storage()


def test_missing_credentials_fail_the_probe_at_once(s3, monkeypatch):
    import fsspec.config

    for name in ("FSSPEC_S3_KEY", "FSSPEC_S3_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(fsspec.config.conf, "s3",
                        {"endpoint_url": s3.env["FSSPEC_S3_ENDPOINT_URL"]})
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    uri = s3.url("run")
    options = {"endpoint_url": s3.env["FSSPEC_S3_ENDPOINT_URL"]}
    with CheckpointManager(uri, PATIENT, storage_options=options) as manager:
        with pytest.raises(StorageError, match=f"{uri}.*NoCredentialsError"):
            manager.check_storage()


def test_the_probe_passes_and_leaves_nothing_behind(s3):
    uri = s3.url("run")
    with CheckpointManager(uri, PATIENT, storage_options=s3.storage_options) as manager:
        manager.check_storage()
        assert manager.writer_epoch == 1
    storage = Storage(uri, s3.storage_options)
    assert not [n for n in [*storage.list_dirs(), *storage.list_files()] if "_probe" in n]


def test_a_restarts_storage_check_runs_beside_its_restore(tmp_path, monkeypatch):
    """A restart starts its probe and epoch claim, restores, then waits for them: the probe here
    finishes only once the restore has read a shard, which a check made before the restore (as
    it once was) would wait for in vain, and fail."""
    uri = f"file://{tmp_path}/run"
    expected = save_two_steps(uri)
    restoring = threading.Event()
    read_bytes = Storage.read_bytes

    def read_and_tell(self, rel, *args, **kwargs):
        if rel.endswith(".distcp"):
            restoring.set()
        return read_bytes(self, rel, *args, **kwargs)

    def probe_after_the_restore_began(self):
        if not restoring.wait(timeout=20):
            raise StorageError("the restore never ran while the probe did")

    monkeypatch.setattr(Storage, "read_bytes", read_and_tell)
    monkeypatch.setattr(Storage, "probe", probe_after_the_restore_began)
    model = build_model(7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, opt, 1, 1)
    with CheckpointManager(uri, CheckpointConfig(keep=5)) as manager:
        manager.start_storage_check()
        state = {"app": ModelOptimizerState(model, opt), "trainer": Trainer()}
        assert manager.load(state) == 2
        manager.check_storage()
        assert manager.writer_epoch == 2  # save_two_steps's writer held epoch 1
    assert_same(full_state(model, opt), expected[2])


def test_two_writers_probing_one_directory_at_once_both_pass(tmp_path):
    """A relaunched job's rank 0 may probe while the old one's still does: neither may remove
    what the other is probing with."""
    storage = Storage(f"file://{tmp_path}/run", {})
    errors: list[Exception] = []

    def probe_often() -> None:
        for _ in range(200):
            try:
                storage.probe()
            except StorageError as e:
                errors.append(e)

    threads = [threading.Thread(target=probe_often) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:1]
    assert not list((tmp_path / "run").iterdir()), "a probe left something behind"


def test_tensors_that_straddle_read_chunks_load_exactly(tmp_path, monkeypatch):
    """Reads come in chunks and each tensor is handed to torch.load from the chunks as they
    arrived; tensors that cross a chunk's end (most of them here, with 4 MiB reads) load whole."""
    import checkpointing.dcp_io as dcp_io

    monkeypatch.setattr(dcp_io, "READ_CHUNK_BYTES", CRC_CHUNK_BYTES)
    g = torch.Generator().manual_seed(0)
    saved = {f"t{i}": torch.randn(1000 + 37 * i, 301, generator=g) for i in range(12)}
    uri = f"file://{tmp_path}/run"
    with CheckpointManager(uri, CheckpointConfig(mode="sync")) as manager:
        assert manager.save(1, {"model": saved})
    loaded = {"model": {k: torch.zeros_like(v) for k, v in saved.items()}}
    with CheckpointManager(uri) as manager:
        assert manager.load(loaded) == 1
    for key, value in saved.items():
        assert torch.equal(loaded["model"][key], value), key
