"""Storage faults injected by our proxy between s3fs and a real S3 server (moto) on loopback.

Transient faults (5xx, throttling, resets, truncated bodies, a write that succeeded but answered
500) are retried and the checkpoint is exact; a permanent failure leaves the previous commit
intact and is reported; credentials never reach logs, events, metrics or COMMIT.json.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from ckpt_workers import Trainer, assert_same, build_model, full_state, run_ranks, train_steps

from checkpointing import CheckpointConfig, CheckpointManager, ModelOptimizerState, SaveFailed
from checkpointing.storage import Storage, redact

pytestmark = pytest.mark.timeout(90)


def trained(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, opt, 1, 2)
    return model, opt


def test_transient_faults_on_save_and_load_are_retried(s3_proxy):
    proxy, uri = s3_proxy.proxy, s3_proxy.url("run")
    config = CheckpointConfig(retry_timeout_s=30)
    proxy.inject("error", status=503, match=r"PUT .*step_00000001/__0_0\.distcp")
    proxy.inject("error", status=429, match=r"PUT .*step_00000001/__0_1\.distcp")
    proxy.inject("error_after_success", status=500, match=r"PUT .*__0_0\.distcp")
    proxy.inject("reset", match=r"PUT .*/\.metadata")
    proxy.inject("error", status=500, match=r"PUT .*COMMIT\.json")
    proxy.inject("reset", match=r"GET .*list-type")
    model, opt = trained()
    expected = full_state(model, opt)
    events: list[dict] = []
    with CheckpointManager(uri, config, on_event=events.append,
                           storage_options=s3_proxy.storage_options) as manager:
        assert manager.save(1, {"app": ModelOptimizerState(model, opt), "trainer": Trainer(1)})
        manager.wait()
        assert [e["event"] for e in events] == ["commit"], events
        proxy.assert_all_fired()

        proxy.inject("truncate", match=r"GET .*__0_0\.distcp")
        proxy.inject("reset", match=r"GET .*__0_1\.distcp")
        proxy.inject("error", status=503, match=r"GET .*/\.metadata")
        proxy.inject("error", status=500, match=r"GET .*COMMIT\.json")
        model2, opt2 = trained(seed=1)
        assert manager.load({"app": ModelOptimizerState(model2, opt2), "trainer": Trainer()}) == 1
        proxy.assert_all_fired()
        assert manager.verify(1).ok
    assert_same(expected, full_state(model2, opt2))
    assert {"error", "reset", "truncate", "error_after_success"} <= set(proxy.fired_kinds())


@pytest.mark.parametrize("on_failure", ["continue", "stop"])
def test_a_save_that_fails_for_good_keeps_the_previous_commit(s3_proxy, on_failure):
    proxy, uri = s3_proxy.proxy, s3_proxy.url("run")
    config = CheckpointConfig(retry_timeout_s=1.0, on_failure=on_failure)
    model, opt = trained()
    state = {"app": ModelOptimizerState(model, opt), "trainer": Trainer(1)}
    expected = full_state(model, opt)
    events: list[dict] = []
    with CheckpointManager(uri, config, on_event=events.append,
                           storage_options=s3_proxy.storage_options) as manager:
        manager.save(1, state)
        manager.wait()
        train_steps(model, opt, 5, 1)
        proxy.inject("error", status=503, count=None, match=r"PUT .*step_00000002")
        manager.save(2, state)
        if on_failure == "stop":
            with pytest.raises(SaveFailed, match="step 2"):
                manager.wait()
        else:
            manager.wait()
        assert manager.metrics["failed"] == 1 and manager.metrics["committed"] == 1
        assert events[-1]["event"] == "save_failed" and events[-1]["step"] == 2
        assert "503" in events[-1]["error"] or "SlowDown" in events[-1]["error"]
        proxy.clear()
        assert manager.latest_step() == 1 and manager.verify(1).ok
        model2, opt2 = trained(seed=3)
        assert manager.load({"app": ModelOptimizerState(model2, opt2)}) == 1
        assert_same(expected, full_state(model2, opt2))
        # Training goes on: the next save commits, and GC then removes the failed step's debris.
        manager.save(3, state)
        manager.wait()
        assert [c.step for c in manager.steps()] == [1, 3]
        assert "step_00000002" not in Storage(uri, s3_proxy.storage_options).list_dirs()


def test_credentials_never_reach_logs_events_metrics_or_commit(s3_proxy, caplog):
    key, secret = "AKIA-TEST-KEY-1234567", "very-secret-value-987654"
    options = {**s3_proxy.storage_options, "key": key, "secret": secret}
    caplog.set_level(logging.DEBUG, logger="checkpointing")
    events: list[dict] = []
    model, opt = trained()
    state = {"app": ModelOptimizerState(model, opt), "trainer": Trainer(1)}
    uri = s3_proxy.url("run")
    with CheckpointManager(uri, CheckpointConfig(retry_timeout_s=0.5), on_event=events.append,
                           storage_options=options) as manager:
        manager.save(1, state)
        manager.wait()
        s3_proxy.proxy.outage(60)
        manager.save(2, state)
        manager.wait()
        s3_proxy.proxy.clear()
        commit = Storage(uri, options).read_bytes("step_00000001/COMMIT.json").decode()
        seen = json.dumps(events) + json.dumps(manager.metrics, default=str) + commit + \
            caplog.text + repr(manager.steps())
    assert events[-1]["event"] == "save_failed"
    assert key not in seen and secret not in seen
    assert redact(f"endpoint said {secret} and {key}", options) == "endpoint said *** and ***"


def test_transient_faults_on_gcs_are_retried(gcs_proxy):
    proxy, uri = gcs_proxy.proxy, gcs_proxy.url("run")
    # gcsfs names small objects in a multipart body, not the URL: fail the first two uploads.
    proxy.inject("error", status=503, match=r"POST /upload/")
    proxy.inject("reset", match=r"POST /upload/")
    model, opt = trained()
    expected = full_state(model, opt)
    with CheckpointManager(uri, CheckpointConfig(retry_timeout_s=30),
                           storage_options=gcs_proxy.storage_options) as manager:
        manager.save(1, {"app": ModelOptimizerState(model, opt)})
        manager.wait()
        assert manager.metrics["committed"] == 1, manager.metrics
        proxy.inject("error", status=500, match=r"GET .*__0_1\.distcp")
        proxy.inject("truncate", match=r"GET .*__0_0\.distcp")
        model2, opt2 = trained(seed=1)
        assert manager.load({"app": ModelOptimizerState(model2, opt2)}) == 1
    proxy.assert_all_fired()
    assert_same(expected, full_state(model2, opt2))


def test_a_failure_seen_by_one_rank_is_raised_on_every_rank(s3_proxy, tmp_path):
    s3_proxy.proxy.inject("error", status=503, count=None, match=r"PUT .*step_00000002/__1_")
    run_ranks(2, "fail_save", {"uri": s3_proxy.url("run"), "out": str(tmp_path)},
              env=s3_proxy.env, timeout=150)
    results = [json.loads((tmp_path / f"fail_save_{r}.json").read_text()) for r in (0, 1)]
    for rank, result in enumerate(results):
        assert "step 2" in result["raised"], (rank, result)
        assert result["metrics"]["committed"] == 1 and result["metrics"]["failed"] == 1
        assert result["latest"] == 1
        # Only rank 0 looked for step 2; every rank raises what it found, as the same class.
        assert result["load_raised"].startswith("NoSuchCheckpoint: no committed step 2 under ")
    assert results[0]["load_raised"] == results[1]["load_raised"]
    assert [e["event"] for e in results[0]["events"]] == ["commit", "save_failed"]
    assert results[1]["events"] == []  # on_event runs on rank 0 only
    assert "rank 1" in results[0]["events"][-1]["error"]


@pytest.mark.parametrize("victim", ["__0_0", "__0_1"])
def test_losing_any_one_file_fails_the_save(s3_proxy, victim):
    # DCP writes a rank's files from several threads, and its helper threads drop exceptions:
    # whichever thread loses its file, the save must fail rather than commit without it.
    s3_proxy.proxy.inject("error", status=400, count=None, match=rf"PUT .*/{victim}\.distcp")
    model, opt = trained()
    with CheckpointManager(s3_proxy.url("run"), CheckpointConfig(retry_timeout_s=0.5),
                           storage_options=s3_proxy.storage_options) as manager:
        manager.save(1, {"app": ModelOptimizerState(model, opt)})
        manager.wait()
        assert manager.metrics["failed"] == 1 and manager.latest_step() is None
    s3_proxy.proxy.assert_all_fired()
