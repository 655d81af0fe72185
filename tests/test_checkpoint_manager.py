"""Manager behaviour: one save in flight (wait or skip), deadline-bounded saves, its config, typed
failures, and the commit protocol's rules as readers and GC see them."""

from __future__ import annotations

import pickle
import struct

import pytest
import torch
from ckpt_workers import Trainer, build_model, train_steps

from checkpointing import (
    CheckpointConfig,
    CheckpointError,
    CheckpointManager,
    ModelOptimizerState,
    NoSuchCheckpoint,
    StorageError,
)
from checkpointing.collectives import Failure
from checkpointing.commit import list_steps
from checkpointing.retention import collect_garbage
from checkpointing.storage import Storage

pytestmark = pytest.mark.timeout(60)


def state() -> dict:
    model = build_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, opt, 1, 1)
    return {"app": ModelOptimizerState(model, opt), "trainer": Trainer(1)}


def test_when_busy_skip_skips_and_wait_waits_and_both_are_counted(s3_proxy):
    proxy, s = s3_proxy.proxy, state()
    for when_busy in ("skip", "wait"):
        uri = s3_proxy.url(when_busy)
        proxy.inject("delay", delay_s=1.5, match=rf"PUT .*/{when_busy}/step_00000001/\.metadata")
        events: list[dict] = []
        with CheckpointManager(uri, CheckpointConfig(when_busy=when_busy), on_event=events.append,
                               storage_options=s3_proxy.storage_options) as manager:
            assert manager.save(1, s) is True
            assert manager.save_in_flight
            second = manager.save(2, s)
            # What had committed at the moment the second save returned:
            committed_then = [e["step"] for e in events if e["event"] == "commit"]
            still_uploading = manager.save_in_flight
            manager.wait()
            if when_busy == "skip":
                # Returned at once: step 1's delayed upload was still going on.
                assert second is False and committed_then == [] and still_uploading
                assert manager.metrics["skipped"] == 1 and manager.metrics["committed"] == 1
                assert manager.latest_step() == 1
            else:
                # Returned only after step 1 committed, with step 2 under way.
                assert second is True and committed_then[:1] == [1]
                assert manager.metrics["waits"] == 1 and manager.metrics["committed"] == 2
                assert manager.latest_step() == 2
    proxy.assert_all_fired()


def test_save_within_a_missed_deadline_leaves_nothing_committed(s3_proxy):
    proxy, s = s3_proxy.proxy, state()
    events: list[dict] = []
    with CheckpointManager(s3_proxy.url("run"), on_event=events.append,
                           storage_options=s3_proxy.storage_options) as manager:
        assert manager.save_within(1, s, deadline_s=30) is True
        proxy.inject("delay", delay_s=2.0, match=r"PUT .*step_00000002/__0_0\.distcp")
        assert manager.save_within(2, s, deadline_s=0.5) is False
        # It returned at its deadline, not after the upload: that is still in flight.
        assert manager.save_in_flight and not events[1:]
        manager.wait()  # the upload finishes in the background, but must not commit
        assert manager.latest_step() == 1
        assert list_steps(manager.storage).partial == [2]
        assert manager.metrics["aborted"] == 1
        assert events[-1]["event"] == "save_failed" and "deadline" in events[-1]["error"]
        assert manager.save_within(3, s, deadline_s=30) is True
        assert [c.step for c in manager.steps()] == [1, 3]
    proxy.assert_all_fired()


def test_sync_mode_returns_committed(tmp_path):
    with CheckpointManager(tmp_path, CheckpointConfig(mode="sync")) as manager:
        assert manager.save(5, state())
        assert not manager.save_in_flight and manager.latest_step() == 5


def test_load_of_an_uncommitted_step_raises_naming_it(tmp_path):
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, state())
        manager.wait()
        with pytest.raises(NoSuchCheckpoint, match="step 9"):
            manager.load(state(), step=9)


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("keep", 0, "must be >= 1"), ("mode", "fast", "must be one of 'async', 'sync'"),
    ("when_busy", "queue", "must be one of 'wait', 'skip'"),
    ("on_failure", "ignore", "must be one of 'continue', 'stop'"),
    ("retry_timeout_s", -1, "must be >= 0"), ("staging", "lazy", "must be one of"),
    ("write_threads", 0, "must be >= 1 (or unset)"), ("collective_timeout_s", 0, "must be > 0")])
def test_bad_config_values_fail_with_one_line_naming_field_value_and_expectation(
        field, value, expected):
    with pytest.raises(ValueError) as e:
        CheckpointConfig(**{field: value})
    assert str(e.value).startswith(f"CheckpointConfig.{field}={value!r} {expected}")
    assert "\n" not in str(e.value)


def test_failures_cross_ranks_typed_and_redacted():
    storage = Failure.of(StorageError("write s3://b/x failed: SlowDown token=s3cr3t"),
                         lambda text: text.replace("s3cr3t", "***"))
    assert pickle.loads(pickle.dumps(storage)) == storage  # what all_gather_object does
    assert type(storage.error()) is StorageError
    assert str(storage.error()) == "write s3://b/x failed: SlowDown token=***"
    assert storage.describe() == "StorageError: write s3://b/x failed: SlowDown token=***"
    missing = Failure.of(NoSuchCheckpoint("no committed step 9"), str)
    assert type(missing.error()) is NoSuchCheckpoint
    other = Failure.of(OSError("disk\nfull"), str)  # any other error: a CheckpointError
    assert type(other.error()) is CheckpointError and other.describe() == "OSError: disk full"


def test_close_is_safe_on_a_half_built_manager_and_twice(tmp_path):
    with pytest.raises(Exception, match="nosuch"):
        CheckpointManager("nosuch://bucket/x")
    manager = CheckpointManager.__new__(CheckpointManager)
    manager.close()
    manager = CheckpointManager(tmp_path)
    manager.close()
    manager.close()


def test_readers_ignore_steps_without_a_whole_commit(tmp_path):
    with CheckpointManager(tmp_path, CheckpointConfig(keep=5)) as manager:
        for step in (1, 2):
            manager.save(step, state())
        manager.wait()
    storage = Storage(str(tmp_path))
    storage.write_bytes("step_00000003/__0_0.distcp", b"partial upload")
    storage.write_bytes("step_00000004/COMMIT.json", b'{"step": 4, "files": ')  # torn: invalid
    storage.write_bytes("step_00000005/COMMIT.json", b'{"step": 99, "world_size": 1, "time": 0,'
                                                     b' "config_digest": "", "files": {}}')
    storage.write_bytes("notes.txt", b"not a step")
    listing = list_steps(storage)
    assert [c.step for c in listing.committed] == [1, 2]
    assert listing.partial == [3, 4, 5]
    # Partial steps newer than the newest commit may be in flight: GC leaves them alone.
    assert collect_garbage(storage, keep=1) != []
    assert storage.list_dirs() == ["_writers", "notes.txt", "step_00000002", "step_00000003",
                                   "step_00000004", "step_00000005"]


def test_gc_never_deletes_the_only_commit_and_removes_older_debris(tmp_path):
    storage = Storage(str(tmp_path))
    storage.write_bytes("step_00000001/__0_0.distcp", b"debris")
    with CheckpointManager(tmp_path, CheckpointConfig(keep=1)) as manager:
        manager.save(2, state())
        manager.wait()  # commit, then retention: the older partial step goes
        assert storage.list_dirs() == ["_writers", "step_00000002"]
        assert manager.gc(keep=1) == []
        with pytest.raises(ValueError, match="keep must be >= 1"):
            manager.gc(keep=0)
        assert manager.latest_step() == 2


def test_deferred_staging_fences_the_next_optimizer_step(tmp_path):
    # Big enough that the background copy is still running when step() is called right away.
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)])
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with CheckpointManager(tmp_path, CheckpointConfig(staging="deferred")) as manager:
        manager.save(1, {"app": ModelOptimizerState(model, opt)})
        opt.step()  # must wait for the copy: the checkpoint holds the state from before it
        assert manager.metrics["fence_waits"] == 1
        manager.wait()
        fresh = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)])
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
        manager.load({"app": ModelOptimizerState(fresh, fresh_opt)})
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, before[key]), key
        assert not torch.equal(value, model.state_dict()[key]), key


def test_loading_into_a_different_model_raises_a_checkpoint_error(tmp_path):
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, state())
        manager.wait()
        other = torch.nn.Sequential(torch.nn.Linear(3, 3))
        with pytest.raises(CheckpointError, match="loading step 1"):
            manager.load({"app": ModelOptimizerState(other, torch.optim.AdamW(other.parameters()))})


@pytest.mark.parametrize("users_setting", [True, False])
def test_a_save_skips_torchs_zip_crc_and_leaves_the_users_setting_as_it_was(tmp_path,
                                                                           users_setting):
    """Our own CRCs guard every byte (COMMIT.json); torch's zip CRC would be a second pass. The
    files still load with DCP's own reader, which does not need it."""
    import torch.distributed.checkpoint as dcp
    from torch.utils.serialization import config

    config.save.compute_crc32 = users_setting
    try:
        state = {"weights": torch.arange(1000, dtype=torch.float32)}
        with CheckpointManager(tmp_path, CheckpointConfig(mode="sync")) as manager:
            manager.save(3, state)
        assert config.save.compute_crc32 is users_setting
        # Every record of the archives DCP wrote carries no CRC (zip central directory).
        data = b"".join(f.read_bytes() for f in (tmp_path / "step_00000003").glob("*.distcp"))
        offsets = [i for i in range(len(data) - 4) if data[i:i + 4] == b"PK\x01\x02"]
        assert offsets and all(struct.unpack_from("<I", data, i + 16)[0] == 0 for i in offsets)
        loaded = {"weights": torch.zeros(1000)}
        dcp.load(loaded, storage_reader=dcp.FileSystemReader(str(tmp_path / "step_00000003")),
                 no_dist=True)
        assert torch.equal(loaded["weights"], state["weights"])
    finally:
        config.save.compute_crc32 = True


def test_a_rank_writes_eight_files_to_an_object_store_and_two_to_a_filesystem(
        s3_proxy, tmp_path, monkeypatch):
    """Concurrent requests add up on an object store; on a filesystem more writers only compete
    with training (docs/benchmarks.md). An explicit `write_threads` wins. A small shard is two
    files even on an object store (16 KiB against the real 32 MiB a file; then 1 KiB)."""
    from checkpointing import save_job

    many = {f"t{i}": torch.full((256,), float(i)) for i in range(16)}
    small = CheckpointConfig(mode="sync")
    with CheckpointManager(s3_proxy.url("small"), small,
                           storage_options=s3_proxy.storage_options) as manager:
        manager.save(1, many)
        assert sum(name.endswith(".distcp") for name in manager.steps()[-1].files) == 2
    monkeypatch.setattr(save_job, "FILE_BYTES", 1024)
    for uri, options, config, files in [
            (s3_proxy.url("files"), s3_proxy.storage_options, CheckpointConfig(mode="sync"), 8),
            (str(tmp_path / "a"), None, CheckpointConfig(mode="sync"), 2),
            (str(tmp_path / "b"), None, CheckpointConfig(mode="sync", write_threads=3), 3)]:
        with CheckpointManager(uri, config, storage_options=options) as manager:
            manager.save(1, many)
            info = manager.steps()[-1]
        assert sum(name.endswith(".distcp") for name in info.files) == files, uri
