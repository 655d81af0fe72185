"""Bad input gets one line and loses nothing: mistyped URIs, missing buckets, a resume with
another data order, a config torchrun would restart forever, a chaos `--out` before its scenario
validates; the prefork socket serves only its own user; credentials in the environment are
redacted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from checkpointing.storage import check_uri, redact
from elastic_train import exit_codes
from elastic_train.node import launch, prefork

pytestmark = pytest.mark.timeout(240)


def trainer(run_dir: Path, *overrides: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    """`python -m elastic_train.train` as a world of one (no torchrun, whose own traceback on a
    failed worker is not ours to judge)."""
    cmd = [sys.executable, "-m", "elastic_train.train", f"--run.dir={run_dir}",
           "--data.batch_size=4", "--data.seq_len=32", "--optim.warmup_steps=1", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=200,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# -- URIs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("uri", ["s3:/bucket/run", "s3//bucket/run", "gs:bucket", "S3:bucket",
                                 "file:/tmp/x", "http://host/x", "s3:///run", "gcs//b"])
def test_a_mistyped_uri_is_refused_naming_it_and_what_is_expected(uri):
    with pytest.raises(ValueError, match="expected s3://bucket/prefix") as e:
        check_uri(uri, "checkpoint.uri")
    assert repr(uri) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("uri", ["s3://b/run", "gs://b/run", "gcs://b/run", "file:///tmp/x",
                                 "/abs/path", "relative/path", "./runs/a:b"])
def test_urls_and_plain_paths_are_accepted(uri):
    check_uri(uri)


def test_the_trainer_refuses_a_mistyped_uri_before_writing_anything(tmp_path):
    proc = trainer(tmp_path / "run", "--steps=2", "--checkpoint.uri=s3:/bucket/run")
    assert proc.returncode == exit_codes.BAD_CONFIG
    assert "checkpoint.uri 's3:/bucket/run' looks like a mistyped URI" in one_error_line(proc)
    assert not (Path.cwd() / "s3:").exists()


def test_a_missing_bucket_fails_before_step_1_naming_the_uri(s3, tmp_path):
    run_dir = tmp_path / "run"
    proc = trainer(run_dir, "--steps=2", "--checkpoint.uri=s3://no-such-bucket-x/run",
                   env=s3.env)
    assert proc.returncode == exit_codes.BAD_CONFIG
    assert "s3://no-such-bucket-x/run" in one_error_line(proc)
    assert not [r for r in records(run_dir) if "step" in r and "event" not in r]


# -- the data order ------------------------------------------------------------------------------
def test_resume_with_another_seed_is_refused_unless_allowed_and_then_recorded(tmp_path):
    run_dir = tmp_path / "run"
    first = trainer(run_dir, "--steps=3", "--checkpoint.every=3", "--seed=1")
    assert first.returncode == 0, first.stderr
    refused = trainer(run_dir, "--steps=5", "--seed=2")
    assert refused.returncode == exit_codes.BAD_CONFIG
    line = one_error_line(refused)
    assert "seed=1" in line and "seed=2" in line and "allow_data_change" in line
    assert max(r["step"] for r in records(run_dir) if "loss" in r) == 3  # nothing trained
    allowed = trainer(run_dir, "--steps=5", "--seed=2", "--checkpoint.allow_data_change=true")
    assert allowed.returncode == 0, allowed.stderr
    (changed,) = [r for r in records(run_dir) if r.get("event") == "data_changed"]
    assert changed["step"] == 3
    assert changed["changed"] == {"seed": {"checkpoint": 1, "now": 2}}


def test_a_run_resumes_past_a_damaged_newest_checkpoint_and_says_so_in_its_metrics(tmp_path):
    run_dir = tmp_path / "run"
    first = trainer(run_dir, "--steps=4", "--checkpoint.every=2", "--checkpoint.keep=3")
    assert first.returncode == 0, first.stderr
    victim = run_dir / "checkpoints" / "step_00000004" / "__0_0.distcp"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    resumed = trainer(run_dir, "--steps=6", "--checkpoint.every=2")
    assert resumed.returncode == 0, resumed.stderr
    (fallback,) = [r for r in records(run_dir) if r.get("event") == "fallback"]
    assert (fallback["step"], fallback["to_step"]) == (4, 2)
    assert fallback["file"].endswith("step_00000004/__0_0.distcp")
    starts = [r for r in records(run_dir) if r.get("event") == "start"]
    assert starts[-1]["restored_step"] == 2
    assert [r["step"] for r in records(run_dir) if "loss" in r][-4:] == [3, 4, 5, 6]


# -- the launcher --------------------------------------------------------------------------------
def node_env(**extra: str) -> dict[str, str]:
    return {"SKYPILOT_NODE_IPS": "10.0.0.1\n10.0.0.2\n", "SKYPILOT_NODE_RANK": "0",
            "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NUM_GPUS_PER_NODE": "1",
            "SKYPILOT_TASK_ID": "task-1", "BUCKET": "s3://bucket/et", "MIN_NODES": "1",
            "RDZV_PORT": "1", **extra}


@pytest.mark.parametrize("extra, message", [
    ({"TRAIN_ARGS": "--optim.lr=-1"}, "optim.lr=-1.0 must be > 0"),
    ({"TRAIN_ARGS": "--stepz=3"}, "unknown config key 'stepz'"),
    ({"DATA_URI": "s3:/data"}, "data.uri 's3:/data' looks like a mistyped URI"),
    ({"CONFIG": "/nonexistent.toml"}, "does not exist"),
    ({"BUCKET": "file:///mnt/ckpt"}, "is a local path on 2 nodes"),
])
def test_the_launcher_refuses_a_bad_config_with_exit_2_before_torchrun(extra, message, capsys):
    assert launch.run_node(node_env(**extra)) == exit_codes.BAD_CONFIG
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_shared_filesystem_may_hold_a_multi_node_run():
    env = node_env(BUCKET="file:///mnt/shared",
                   TRAIN_ARGS="--checkpoint.shared_filesystem=true")
    launch.agent_command(launch.Node.from_env(env), env)  # no LaunchError


# -- chaos --out ---------------------------------------------------------------------------------
def test_chaos_run_keeps_the_previous_out_when_the_scenario_is_bad(tmp_path, capsys):
    import argparse

    from chaos import cli as chaos_cli

    out = tmp_path / "out"
    (out / "run").mkdir(parents=True)
    (out / "report.json").write_text("{}")
    scenario = tmp_path / "bad.yaml"
    source = Path(__file__).resolve().parent.parent / "chaos" / "scenarios" / "ci-nodes.yaml"
    scenario.write_text(source.read_text() + "\ntrain:\n  optim.lr: -1\n")
    parser = argparse.ArgumentParser()
    chaos_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["chaos", "run", str(scenario), "--out", str(out)])
    assert args.func(args) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert (out / "report.json").read_text() == "{}" and (out / "run").is_dir()


# -- the prefork socket --------------------------------------------------------------------------
@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another user")
def test_the_prefork_server_refuses_another_user(tmp_path):
    path = f"/tmp/et-peer-{os.getpid()}.sock"
    server = subprocess.Popen([sys.executable, "-m", "elastic_train.node.prefork", "--socket",
                               path, "--preload", "json"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "LISTENING"
        os.chmod(path, 0o666)  # as a careless umask or chmod would leave it
        marker = tmp_path / "ran"
        script = tmp_path / "mark.py"
        script.write_text(f"open({str(marker)!r}, 'w').close()\n")
        command = [str(script)]

        def connect_as(uid: int) -> int:
            child = os.fork()
            if child == 0:  # pragma: no cover - the child reports through its exit status
                try:
                    os.setuid(uid)
                    code = prefork.run_through_server(path, command)
                    os._exit(3 if code is None else 4)
                except BaseException:
                    os._exit(5)
            return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])

        assert connect_as(65534) == 3  # no reply: refused, the client would start cold
        assert not marker.exists()
        assert connect_as(os.getuid()) == 4 and marker.exists()  # its own user is served
    finally:
        server.terminate()
        server.wait(10)
        prefork.remove(path)


# -- redaction -----------------------------------------------------------------------------------
def test_every_credential_variable_fsspec_reads_is_redacted(monkeypatch):
    secrets = {"AWS_SECRET_ACCESS_KEY": "aws-secret-123", "AWS_SESSION_TOKEN": "sess-tok-456",
               "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "FSSPEC_S3_SECRET": "fs-s3-secret",
               "FSSPEC_S3_KEY": "fs-s3-key-1", "GOOGLE_APPLICATION_CREDENTIALS": "/k/sa.json",
               "FSSPEC_GCS_TOKEN": "ya29.gcs-token", "AWS_CONTAINER_AUTHORIZATION_TOKEN": "ctok-7"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    text = "failed: " + " ".join(secrets.values()) + " in us-east-1"
    out = redact(text, {"client_kwargs": {"aws_secret_access_key": "opt-secret-9"}})
    assert not any(v in out for v in secrets.values()), out
    assert "us-east-1" in out  # a region is not a secret
    assert redact("x opt-secret-9", {"client_kwargs": {"aws_secret_access_key":
                                                       "opt-secret-9"}}) == "x ***"
