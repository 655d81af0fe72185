"""Two real writer processes of one run, on a local disk and on S3 (moto): only the newest writer
generation may commit or delete; and no COMMIT.json lists a file that is gone."""

from __future__ import annotations

import subprocess

import pytest
import torch
from ckpt_workers import Trainer, build_model, spawn_single

from checkpointing import CheckpointConfig, CheckpointManager, ModelOptimizerState
from checkpointing.commit import list_steps, read_commit, verify_step
from checkpointing.fence import claim_epoch, newest_epoch
from checkpointing.save_job import SaveWriter
from checkpointing.storage import Storage

pytestmark = pytest.mark.timeout(180)


class Writer:
    """One `writer` process of tests/ckpt_workers.py, spoken to a line at a time."""

    def __init__(self, uri: str, seed: int) -> None:
        self.proc = spawn_single("writer", {"uri": uri, "seed": seed}, stdin=subprocess.PIPE)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def answer(self) -> str:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"writer exited {self.proc.wait()}")
            if line.startswith(("EPOCH", "COMMITTED", "FAILED", "GC")):
                return line.strip()

    def ask(self, line: str) -> str:
        self.send(line)
        return self.answer()

    def close(self) -> None:
        try:
            self.send("quit")
            self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def test_a_superseded_writer_can_neither_commit_nor_delete(run_store):
    uri, options = run_store
    writers = [Writer(uri, seed) for seed in (1, 2)]
    try:
        # Both claim at once: the exclusive create gives them different epochs.
        for w in writers:
            w.send("claim")
        epochs = [int(w.answer().split()[1]) for w in writers]
        assert sorted(epochs) == [1, 2]
        old, new = sorted(zip(epochs, writers, strict=True))
        old_w, new_w = old[1], new[1]
        assert new_w.ask("save 5") == "COMMITTED 5"
        # The old writer saving the same step would first clear it: refused, nothing deleted.
        answer = old_w.ask("save 5")
        assert answer.startswith("FAILED 5") and "superseded by epoch 2" in answer, answer
        assert old_w.ask("save 6").startswith("FAILED 6")
        assert old_w.ask("gc").startswith("FAILED gc")
        assert new_w.ask("save 7") == "COMMITTED 7"
    finally:
        for w in writers:
            w.close()
    storage = Storage(uri, options)
    listing = list_steps(storage)
    assert [c.step for c in listing.committed] == [7]  # keep=1: the new writer's GC ran
    assert 6 not in listing.partial  # the old writer wrote no data either
    info = read_commit(storage, 7)
    assert info is not None and info.writer_epoch == 2
    assert verify_step(storage, info).ok


def test_epochs_only_grow_and_old_epoch_files_are_forgotten(tmp_path):
    storage = Storage(str(tmp_path))
    epochs = [claim_epoch(storage) for _ in range(6)]
    assert epochs == [1, 2, 3, 4, 5, 6]
    assert newest_epoch(storage) == 6
    assert len(storage.list_files("_writers")) < 6


def test_a_create_that_lost_the_race_raises_file_exists(run_store):
    uri, options = run_store
    storage = Storage(uri, options)
    storage.create_exclusive("x", b"one")
    with pytest.raises(FileExistsError):
        storage.create_exclusive("x", b"two")
    assert storage.read_bytes("x") == b"one"



def test_a_step_whose_files_vanish_before_its_commit_is_not_committed(tmp_path, monkeypatch):
    # An operator's `ckpt gc` (or any deleter) removing a file of a step still being filled,
    # at the last moment: right after the writer's fence check for the commit.
    original = SaveWriter.check_epoch

    def check_then_lose_a_file(self: SaveWriter, action: str) -> None:
        original(self, action)
        if action == "commit step 2":
            self.storage.remove(["step_00000002/__0_0.distcp"])

    monkeypatch.setattr(SaveWriter, "check_epoch", check_then_lose_a_file)
    model = build_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    events: list[dict] = []
    uri = f"file://{tmp_path}/run"
    with CheckpointManager(uri, CheckpointConfig(mode="sync"), on_event=events.append) as m:
        for step in (1, 2):
            m.save(step, {"app": ModelOptimizerState(model, opt), "trainer": Trainer(step)})
        assert m.latest_step() == 1
    (failed,) = [e for e in events if e["event"] == "save_failed"]
    assert failed["step"] == 2 and "__0_0.distcp: missing" in failed["error"]
