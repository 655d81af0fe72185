"""A writer process SIGKILLed at three points of a save, against S3 (moto) behind our proxy.

The proxy holds one request of the step-2 save (and never forwards it), so the writer is frozen
exactly there when we kill it: (a) mid data upload, (b) data durable but no DCP .metadata,
(c) everything but COMMIT.json. Each time the newest committed step must still be step 1 and load
exactly; once a newer step commits, GC removes the step-2 debris.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from ckpt_workers import Trainer, assert_same, build_model, full_state, spawn_single, train_steps

from checkpointing import CheckpointConfig, CheckpointManager, ModelOptimizerState
from checkpointing.storage import Storage

pytestmark = pytest.mark.timeout(120)

KILL_POINTS = {
    "data": r"PUT /ckpt-test/kill-data/step_00000002/__0_0\.distcp",
    "meta": r"PUT /ckpt-test/kill-meta/step_00000002/\.metadata",
    "commit": r"PUT /ckpt-test/kill-commit/step_00000002/COMMIT\.json",
}


def test_writer_killed_mid_save_leaves_previous_commit_newest_and_loadable(s3_proxy, tmp_path):
    proxy = s3_proxy.proxy
    rules, procs = {}, {}
    for point, match in KILL_POINTS.items():
        rules[point] = proxy.inject("drop", match=match, delay_s=60)
        (tmp_path / point).mkdir()
        # Three writers at once: one process start-up's worth of wall time for all of them.
        procs[point] = spawn_single("kill_writer", {"uri": s3_proxy.url(f"kill-{point}"),
                                                    "out": str(tmp_path / point)},
                                    env=s3_proxy.env)
    try:
        deadline = time.monotonic() + 90
        # The held data file is one of two the writer uploads at once: wait until the other
        # one has landed (seen on the server itself), so that the step has debris to ignore.
        direct = Storage(s3_proxy.url("kill-data"), s3_proxy.server.storage_options())
        while any(r.fired == 0 for r in rules.values()) or \
                "step_00000002" not in direct.list_dirs():
            for point, proc in procs.items():
                if proc.poll() is not None:
                    pytest.fail(f"writer {point} exited early:\n{proc.stdout.read()}")
            assert time.monotonic() < deadline, "a writer never reached its kill point"
            time.sleep(0.05)
        for proc in procs.values():
            os.killpg(proc.pid, signal.SIGKILL)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        proxy.clear()

    for point in KILL_POINTS:
        with CheckpointManager(s3_proxy.url(f"kill-{point}"), CheckpointConfig(keep=3),
                               storage_options=s3_proxy.storage_options) as manager:
            dirs = manager.storage.list_dirs()
            assert "step_00000002" in dirs, (point, dirs)  # debris is there...
            assert manager.latest_step() == 1, point  # ...but does not count
            model = build_model(seed=42)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            trainer = Trainer()
            assert manager.load({"app": ModelOptimizerState(model, opt), "trainer": trainer}) == 1
            expected = torch.load(tmp_path / point / "expected_1.pt", weights_only=False)
            assert_same(expected, full_state(model, opt))
            assert trainer.step == 1
            # The run resumes and commits step 3: GC now removes the step-2 debris.
            train_steps(model, opt, 2, 1)
            manager.save(3, {"app": ModelOptimizerState(model, opt), "trainer": Trainer(3)})
            manager.wait()
            assert manager.storage.list_dirs() == ["_writers", "step_00000001",
                                                   "step_00000003"], point
            assert [c.step for c in manager.steps()] == [1, 3]
