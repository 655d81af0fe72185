"""The manager against every backend: file://, a plain path, S3 (moto) and GCS (emulator); the
`ckpt` CLI; copying committed checkpoints between clouds."""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import urllib.parse

import pytest
import torch
from ckpt_workers import Trainer, assert_same, build_model, full_state, train_steps

from checkpointing import CheckpointConfig, CheckpointManager, ModelOptimizerState
from checkpointing import cli as ckpt_cli
from checkpointing.commit import read_commit
from checkpointing.storage import Storage

pytestmark = pytest.mark.timeout(60)


def trained(seed: int = 0, steps: int = 2) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, opt, 1, steps)
    return model, opt


def save_steps(uri: str, steps: list[int], options: dict | None = None, **config) -> dict:
    """Save `steps` of one training run; returns {step: full state at that step}."""
    model, opt = trained()
    expected = {}
    events: list[dict] = []
    with CheckpointManager(uri, CheckpointConfig(**config), config_digest="cfg-1",
                           on_event=events.append, storage_options=options) as manager:
        for step in steps:
            train_steps(model, opt, 10 + step, 1)
            expected[step] = full_state(model, opt)
            assert manager.save(step, {"app": ModelOptimizerState(model, opt),
                                       "trainer": Trainer(step)})
        manager.wait()
        assert [e["step"] for e in events if e["event"] == "commit"] == steps, events
    return expected


def load_latest(uri: str, options: dict | None = None) -> tuple[int | None, dict, Trainer]:
    model, opt = trained(seed=99, steps=1)
    trainer = Trainer(-1)
    with CheckpointManager(uri, storage_options=options) as manager:
        step = manager.load({"app": ModelOptimizerState(model, opt), "trainer": trainer})
    return step, full_state(model, opt), trainer


@pytest.fixture(params=["file", "path", "s3", "gs"])
def store_uri(request, tmp_path) -> tuple[str, dict]:
    if request.param == "file":
        return f"file://{tmp_path}/run", {}
    if request.param == "path":
        return str(tmp_path / "run"), {}
    store = request.getfixturevalue("s3" if request.param == "s3" else "gcs")
    return store.url("run"), store.storage_options


def test_save_then_load_round_trips_on_every_backend(store_uri):
    uri, options = store_uri
    expected = save_steps(uri, [2, 4], options, keep=3)
    step, got, trainer = load_latest(uri, options)
    assert step == 4 and trainer.step == 4
    assert assert_same(expected[4], got) > 0
    manager = CheckpointManager(uri, storage_options=options)
    assert [c.step for c in manager.steps()] == [2, 4]
    assert manager.verify().ok and manager.verify(2).ok
    info = manager.steps()[-1]
    assert info.world_size == 1 and info.config_digest == "cfg-1"
    assert {".metadata"} < set(info.files) and all(r.size > 0 for r in info.files.values())


def test_nothing_committed_loads_as_none_and_leaves_state_alone(tmp_path):
    model, opt = trained()
    before = full_state(model, opt)
    with CheckpointManager(f"file://{tmp_path}/empty") as manager:
        assert manager.load({"app": ModelOptimizerState(model, opt)}) is None
        assert manager.latest_step() is None and manager.steps() == []
        assert not manager.verify().ok
    assert_same(before, full_state(model, opt))


def test_retention_keeps_the_newest_k(tmp_path):
    uri = f"file://{tmp_path}/run"
    save_steps(uri, [1, 2, 3, 4], keep=2)
    assert [c.step for c in CheckpointManager(uri).steps()] == [3, 4]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["_writers", "step_00000003",
                                                                   "step_00000004"]


def test_node_local_cache_is_used_only_while_it_matches_the_remote_commit(s3, tmp_path):
    uri, cache = s3.url("run"), str(tmp_path / "cache")
    expected = save_steps(uri, [1, 2], s3.storage_options, cache_dir=cache)
    config = CheckpointConfig(cache_dir=cache)
    model, opt = trained(seed=5)
    with CheckpointManager(uri, config, storage_options=s3.storage_options) as manager:
        assert manager.load({"app": ModelOptimizerState(model, opt)}) == 2
        n_files = len(manager.steps()[-1].files)
        assert manager.metrics["last_load_from_cache_files"] == n_files
    assert_same(expected[2], full_state(model, opt))
    # Only the newest step stays cached.
    (run_dir,) = (tmp_path / "cache").iterdir()
    assert [p.name for p in run_dir.iterdir()] == ["step_00000002"]
    # A damaged cached file is not trusted: the remote copy is read instead, and loads exactly.
    victim = next(p for p in (run_dir / "step_00000002").iterdir() if p.suffix == ".distcp")
    victim.write_bytes(b"\0" * victim.stat().st_size)
    model, opt = trained(seed=6)
    with CheckpointManager(uri, config, storage_options=s3.storage_options) as manager:
        assert manager.load({"app": ModelOptimizerState(model, opt)}) == 2
        assert manager.metrics["last_load_from_cache_files"] == n_files - 1
    assert_same(expected[2], full_state(model, opt))


# -- CLI ---------------------------------------------------------------------------------------
def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="elastic-train")
    ckpt_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_cli_ls_verify_gc_copy_across_clouds(s3, gcs, tmp_path, capsys):
    src = s3.url("run")
    expected = save_steps(src, [1, 2, 3], s3.storage_options, keep=10)
    (tmp_path / "x").mkdir()
    Storage(src).write_bytes("step_00000000/__0_0.distcp", b"debris")  # a partial, older step
    assert run_cli("ckpt", "ls", src, "--json") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["step"], r["committed"]) for r in rows] == [(0, False), (1, True), (2, True),
                                                            (3, True)]
    assert run_cli("ckpt", "verify", src) == 0
    assert "ok: step 3" in capsys.readouterr().out
    assert run_cli("ckpt", "gc", src, "--keep", "2") == 0
    out = capsys.readouterr().out
    assert "step_00000000" in out and "step_00000001" in out and "step_00000002" not in out
    dst = gcs.url("copy")
    assert run_cli("ckpt", "copy", src, dst) == 0
    assert run_cli("ckpt", "copy", src, dst, "--step", "3") == 0  # again: already there
    assert "already there" in capsys.readouterr().out
    assert run_cli("ckpt", "verify", dst, "--step", "2") == 0
    step, got, _ = load_latest(dst, gcs.storage_options)
    assert step == 3
    assert_same(expected[3], got)


def test_cli_reports_a_corrupt_file_and_bad_input_in_one_line(tmp_path, capsys):
    uri = f"file://{tmp_path}/run"
    save_steps(uri, [1])
    victim = next((tmp_path / "run" / "step_00000001").glob("*.distcp"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert run_cli("ckpt", "verify", uri) == 1
    assert "crc32" in capsys.readouterr().out
    assert run_cli("ckpt", "verify", uri, "--quick") == 0  # same size: only the CRC catches it
    capsys.readouterr()
    assert run_cli("ckpt", "verify", uri, "--step", "7") == 1
    assert capsys.readouterr().err.strip() == \
        f"elastic-train ckpt: error: no committed step 7 under {uri}"
    assert run_cli("ckpt", "ls", "nosuch://bucket/x") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'nosuch'" in err
    with pytest.raises(SystemExit):
        run_cli("ckpt", "gc", uri, "--keep", "0")
    assert "0 must be >= 1" in capsys.readouterr().err


def test_an_s3_upload_sends_the_crc_that_commit_json_records(s3):
    """S3 checks each file's body against the CRC-32 we record (a damaged upload is refused and
    retried), and botocore, given it, does not hash the bytes once more."""
    sent: dict[str, dict[str, str]] = {}

    def capture(request, **_) -> None:
        name = urllib.parse.urlsplit(request.url).path.rsplit("/", 1)[-1]
        sent[name] = {k.lower(): v.decode() if isinstance(v, bytes) else v
                      for k, v in request.headers.items()}

    model, opt = trained()
    with CheckpointManager(s3.url("run"), CheckpointConfig(mode="sync"),
                           storage_options=s3.storage_options) as manager:
        manager.storage.list_files()  # the client exists once it has been used
        events = manager.storage.fs.s3.meta.events  # the process's client: leave it as it was
        events.register("before-send.s3.PutObject", capture)
        try:
            assert manager.save(1, {"app": ModelOptimizerState(model, opt)})
        finally:
            events.unregister("before-send.s3.PutObject", capture)
        info = read_commit(manager.storage, 1)
    assert info is not None and info.files
    for name, record in info.files.items():
        crc = base64.b64encode(record.crc32.to_bytes(4, "big")).decode()
        assert sent[name]["x-amz-checksum-crc32"] == crc, name
        assert "x-amz-sdk-checksum-algorithm" not in sent[name], name  # not computed again


PREPARED_CHILD = """
import json, os, sys, threading
import s3fs, botocore.loaders
from checkpointing import storage
if sys.argv[1].startswith("prepare"):
    storage.prepare_sessions()
threads = threading.active_count()
pid = os.fork()
if pid == 0:  # a worker forked from the node's prefork server
    loaded = []
    load_file = botocore.loaders.JSONFileLoader.load_file
    def counting(self, path):
        loaded.append(os.path.basename(os.path.dirname(path)) + "/" + os.path.basename(path))
        return load_file(self, path)
    botocore.loaders.JSONFileLoader.load_file = counting
    if sys.argv[1] == "prepare-then-other-env":  # the worker was sent another AWS_* environment
        os.environ["AWS_DEFAULT_REGION"] = "eu-west-1"
    store = storage.Storage(sys.argv[2], json.loads(sys.argv[3]))
    store.write_bytes("probe", b"written by a fork")
    ok = store.read_bytes("probe") == b"written by a fork"
    print(json.dumps({"ok": ok, "threads_before_fork": threads, "loaded": loaded,
                      "prepared": store.fs.session is storage._PREPARED_SESSIONS.get("s3")}))
    sys.stdout.flush()
    os._exit(0)
os.waitpid(pid, 0)
"""


@pytest.mark.parametrize("mode, prepare", [("prepare", True), ("cold", False),
                                           ("prepare-then-other-env", False)])
def test_a_fork_of_a_prepared_process_makes_its_s3_client_without_loading_botocores_data(
        s3, mode, prepare):
    """The prefork server prepares a session before it forks workers: a worker then reads none
    of botocore's service files to make its client (without it, each worker reads them again),
    still resolves its own credentials and endpoint, and the server stays single-threaded. A
    worker whose AWS_* environment differs from the server's makes a session of its own."""
    proc = subprocess.run(
        [sys.executable, "-c", PREPARED_CHILD, mode, s3.url(),
         json.dumps(s3.storage_options)],
        capture_output=True, text=True, env={**os.environ, **s3.env}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["ok"] and seen["threads_before_fork"] == 1
    assert seen["prepared"] is prepare
    if prepare:
        assert seen["loaded"] == [], seen["loaded"]
    else:
        assert any("service-2" in name for name in seen["loaded"]), seen["loaded"]
