"""The SkyPilot YAMLs under sky/, `elastic-train sky render` and the per-node launcher, checked
with SkyPilot 0.14.1's own parser, schema and registries (offline; no cloud account).

SkyPilot runs in one subprocess for the whole module: `import sky` is slow and creates `~/.sky`,
so it gets a HOME of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from elastic_train import exit_codes
from elastic_train.node import agent, launch, sky_render
from elastic_train.node.contract import NOTICE_FILE_ENV, PREFORK_SOCKET_ENV

ROOT = Path(__file__).resolve().parents[1]
SKY_DIR = ROOT / "sky"
YAMLS = sorted(SKY_DIR.glob("*.yaml"))
TRAINER_CODES = sorted({exit_codes.COLLECTIVE_TIMEOUT, exit_codes.CHECKPOINT_FAILED,
                        exit_codes.PREEMPTED})

pytest.importorskip("sky", reason="skypilot (the `sky` extra) is not installed")

RENDERS: dict[str, list[str]] = {
    "one_accelerator": ["--nodes", "4", "--accelerators", "A100:8",
                        "--bucket", "s3://my-bucket/et/"],
    "accelerator_set_two_regions": [
        "--nodes", "2", "--accelerators", "A100:8,H100:8", "--bucket", "gs://b/et",
        "--infra", "gcp/us-central1", "--infra", "aws/us-east-1", "--min-nodes", "2",
        "--data-uri", "gs://b/data", "--train-args", "--steps=1000 --model=base"],
    "resume_on_demand_one_cloud": [
        "--nodes", "3", "--accelerators", "L4:1", "--bucket", "gs://b/et", "--run-name", "old",
        "--infra", "gcp", "--on-demand", "--max-restarts-on-errors", "5"],
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elastic-train")
    sky_render.register(parser.add_subparsers(dest="command", required=True))
    return parser


def _render(argv: list[str]) -> tuple[int, str, str]:
    import contextlib
    import io

    args = _parser().parse_args(["sky", "render", *argv])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = args.func(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """`elastic-train sky check --json` over every YAML under sky/, every rendered YAML and two
    broken ones, in one subprocess. Keyed by file name (rendered: `render-<case>.yaml`)."""
    tmp = tmp_path_factory.mktemp("sky")
    files = [str(p) for p in YAMLS]
    for case, argv in RENDERS.items():
        code, out, err = _render(argv)
        assert code == 0, err
        path = tmp / f"render-{case}.yaml"
        path.write_text(out)
        files.append(str(path))
    broken = yaml.safe_load((SKY_DIR / "train.yaml").read_text())
    broken["resources"]["job_recovery"] = {"strategy": "EAGER_NEXT_ZONE",
                                           "max_restart_on_errors": 3}
    (tmp / "broken-recovery.yaml").write_text(yaml.safe_dump(broken))
    broken["resources"]["job_recovery"] = {"strategy": "FAILOVER"}
    broken["resources"]["use_spots"] = True
    (tmp / "broken-schema.yaml").write_text(yaml.safe_dump(broken))
    files += [str(tmp / "broken-recovery.yaml"), str(tmp / "broken-schema.yaml")]

    home = tmp / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    code = ("import sys; from elastic_train.node.sky_render import main_check; "
            "sys.exit(main_check(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, *files], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    return {Path(r["path"]).name: r for r in json.loads(proc.stdout)}


@pytest.mark.parametrize("name", [p.name for p in YAMLS])
def test_every_yaml_under_sky_passes_skypilots_parser_and_schema(checked, name):
    assert checked[name]["errors"] == []


@pytest.mark.parametrize("case", list(RENDERS))
def test_rendered_yaml_passes_the_same_checks(checked, case):
    result = checked[f"render-{case}.yaml"]
    assert result["errors"] == []
    assert result["required_envs"] == [], "a rendered YAML launches without --env"


def test_check_catches_what_skypilots_parser_lets_through(checked):
    errors = " ".join(checked["broken-recovery.yaml"]["errors"])
    assert "'EAGER_NEXT_ZONE' is not one of ['EAGER_NEXT_REGION', 'FAILOVER']" in errors
    assert "max_restart_on_errors" in errors
    assert "use_spots" in " ".join(checked["broken-schema.yaml"]["errors"])


def test_train_yaml_is_a_multi_node_spot_job_across_clouds(checked):
    result = checked["train.yaml"]
    assert result["num_nodes"] >= 2
    resources = result["resources"]
    assert all(r["use_spot"] for r in resources)
    assert {r["infra"].split("/")[0] for r in resources} >= {"aws", "gcp"}
    assert len({json.dumps(r["accelerators"]) for r in resources}) >= 2, "an accelerator set"


def test_job_recovery_suits_multi_node_and_recovers_exactly_the_trainers_codes(checked):
    for r in checked["train.yaml"]["resources"]:
        recovery = r["job_recovery"]
        # Tear down and try another region: a multi-node job is relaunched whole anyway.
        assert recovery["strategy"] == "EAGER_NEXT_REGION"
        assert recovery["max_restarts_on_errors"] >= 1
        assert recovery["recover_on_exit_codes"] == TRAINER_CODES
        assert 137 not in recovery["recover_on_exit_codes"]


def test_trainer_exit_codes_are_distinct_and_not_signal_deaths():
    assert len(set(TRAINER_CODES)) == 3
    assert all(code < 128 for code in TRAINER_CODES)


def test_train_yaml_declares_every_env_the_launcher_reads(checked):
    result = checked["train.yaml"]
    assert set(launch.TASK_ENVS) <= set(result["envs"])
    assert result["required_envs"] == ["BUCKET"]
    assert result["run"].strip() == "exec python -m elastic_train.node.launch"


def test_prepare_data_yaml_requires_its_destination(checked):
    result = checked["prepare-data.yaml"]
    assert result["required_envs"] == ["DATA_URI"]
    assert 'elastic-train data prepare --out "$DATA_URI"' in result["run"]


def test_secrets_are_never_in_a_yaml():
    for path in YAMLS:
        text = path.read_text()
        assert "secrets:" not in text
        for word in ("AWS_SECRET_ACCESS_KEY=", "aws_secret_access_key", "private_key"):
            assert word not in text, f"{path.name} holds {word}"


def test_preemption_hook_writes_the_notice_the_trainer_reads(checked, tmp_path):
    hooks = checked["train.yaml"]["hooks"]
    assert [h["events"] for h in hooks] == [["preemption"]]
    script = hooks[0]["run"].replace("sleep 25", "")
    assert "sleep 25" in hooks[0]["run"] and hooks[0]["timeout"] > 25
    subprocess.run(["bash", "-c", script], env={**os.environ, "HOME": str(tmp_path)}, check=True,
                   timeout=30)
    notice = Path(os.path.expanduser(launch.NOTICE_FILE.replace("~", str(tmp_path))))
    assert json.loads(notice.read_text())["deadline"] > 0


def test_render_fills_in_the_values():
    code, out, _ = _render(RENDERS["accelerator_set_two_regions"])
    assert code == 0
    task = yaml.safe_load(out)
    assert task["num_nodes"] == 2
    res = task["resources"]
    assert res["accelerators"] == {"A100": 8, "H100": 8}
    assert res["any_of"] == [{"infra": "gcp/us-central1"}, {"infra": "aws/us-east-1"}]
    assert res["use_spot"] is True
    assert task["envs"]["BUCKET"] == "gs://b/et"
    assert task["envs"]["MIN_NODES"] == "2"
    assert task["envs"]["TRAIN_ARGS"] == "--steps=1000 --model=base"
    assert task["config"]["hooks"], "the preemption hook survives rendering"


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "0", "--accelerators", "A100:8", "--bucket", "s3://b/x"], "--nodes=0"),
    (["--nodes", "2", "--accelerators", "A100:8"], "--bucket"),
    (["--nodes", "2", "--accelerators", "A100:x", "--bucket", "s3://b/x"], "'A100:x'"),
    (["--nodes", "2", "--accelerators", "A100:8", "--bucket", "/local/dir"], "must start with"),
    (["--nodes", "2", "--accelerators", "A100:8", "--bucket", "s3://b", "--min-nodes", "3"],
     "--min-nodes=3"),
])
def test_render_refuses_what_cannot_run_with_one_line(argv, message):
    code, out, err = _render(argv)
    assert code == exit_codes.BAD_CONFIG and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- the launcher

def _node_env(rank: int = 1, nodes: int = 3, **extra: str) -> dict[str, str]:
    return {
        "SKYPILOT_NODE_IPS": "\n".join(f"10.0.0.{i + 1}" for i in range(nodes)) + "\n",
        "SKYPILOT_NODE_RANK": str(rank),
        "SKYPILOT_NUM_NODES": str(nodes),
        "SKYPILOT_NUM_GPUS_PER_NODE": "8",
        "SKYPILOT_TASK_ID": "sky-managed-2026-11-23_elastic-train_7-0",
        "BUCKET": "s3://bucket/et/",
        "RUN_NAME": "", "DATA_URI": "", "CONFIG": "", "TRAIN_ARGS": "", "MIN_NODES": "1",
        **extra,
    }


def _torchrun_args(env: dict[str, str]) -> list[str]:
    return launch.agent_command(launch.Node.from_env(env), env).torchrun_args()


def test_launcher_builds_torchrun_from_skypilots_variables():
    env = _node_env(TRAIN_ARGS="--steps=5 --checkpoint.every=2", DATA_URI="s3://bucket/data",
                    CONFIG="elastic_train/configs/base.toml", MIN_NODES="2")
    args = _torchrun_args(env)
    task_id = env["SKYPILOT_TASK_ID"]
    assert args[:9] == [
        "--nnodes=2:3", "--nproc-per-node=8", "--rdzv-backend=c10d-fast",
        "--rdzv-endpoint=10.0.0.1:29400", f"--rdzv-id={task_id}",
        f"--rdzv-conf={launch.RDZV.conf()}",
        "--local-addr=10.0.0.2", f"--max-restarts={agent.DEFAULT_MAX_RESTARTS}",
        f"--monitor-interval={agent.DEFAULT_MONITOR_INTERVAL_S:g}"]
    assert "is_host=false" in launch.RDZV.conf() and "last_call_timeout=1," in launch.RDZV.conf()
    # Each rank hands the trainer's arguments to the node's prefork server.
    entry = args.index("-m")
    assert args[entry:entry + 2] == ["-m", "elastic_train.node.worker"]
    assert args[entry + 2:] == ["--config", "elastic_train/configs/base.toml",
                                f"--checkpoint.uri=s3://bucket/et/runs/{task_id}",
                                "--data.uri=s3://bucket/data", "--steps=5", "--checkpoint.every=2"]


def test_launcher_gives_its_agent_a_prefork_socket_a_notice_file_and_a_private_store():
    env = _node_env(**{NOTICE_FILE_ENV: "/tmp/et-notice"})
    command = launch.agent_command(launch.Node.from_env(env), env)
    agent_env = command.env(env)
    assert agent_env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert agent_env[NOTICE_FILE_ENV] == "/tmp/et-notice"
    assert agent_env[PREFORK_SOCKET_ENV] == command.prefork_socket
    assert len(command.prefork_socket.encode()) <= 108
    assert command.argv()[1:4] == ["-m", "elastic_train.node.launch", "--agent"]


def test_a_prefork_socket_is_only_for_the_trainer_entry():
    settings = dict(min_nodes=1, max_nodes=1, procs_per_node=1, rdzv=launch.RDZV,
                    rdzv_endpoint="127.0.0.1:1", run_id="r", timer_file="t", notice_file="n")
    cold = agent.AgentCommand(entry=["-m", "elastic_train.train", "--steps=3"], **settings)
    assert cold.torchrun_args()[-3:] == ["-m", "elastic_train.train", "--steps=3"]
    assert PREFORK_SOCKET_ENV not in cold.env({PREFORK_SOCKET_ENV: "/tmp/inherited.sock"})
    with pytest.raises(ValueError, match="only the trainer"):
        agent.AgentCommand(entry=["script.py"], prefork_socket="/tmp/s.sock", **settings)


def test_launcher_resumes_a_named_run_and_runs_one_worker_without_gpus():
    env = _node_env(rank=0, nodes=1, RUN_NAME="old", BUCKET="gs://other/et/",
                    SKYPILOT_NUM_GPUS_PER_NODE="0")
    args = _torchrun_args(env)
    assert "--nproc-per-node=1" in args and "--nnodes=1:1" in args
    assert "--checkpoint.uri=gs://other/et/runs/old" in args


@pytest.mark.parametrize("change, message", [
    ({"SKYPILOT_NODE_RANK": ""}, "SKYPILOT_NODE_RANK is not set"),
    ({"SKYPILOT_NUM_NODES": "2"}, "lists 3 nodes"),
    ({"SKYPILOT_NODE_RANK": "3"}, "not in [0, 3)"),
    ({"BUCKET": ""}, "set BUCKET"),
    ({"MIN_NODES": "4"}, "MIN_NODES=4"),
])
def test_launcher_refuses_a_bad_environment_with_exit_2(change, message, capsys):
    assert launch.run_node(_node_env(**change)) == exit_codes.BAD_CONFIG
    assert message in capsys.readouterr().err


def test_launcher_exits_with_the_trainers_code_so_skypilot_can_recover_on_it():
    assert launch.exit_code_of({0: 1, 1: exit_codes.PREEMPTED}) == exit_codes.PREEMPTED
    assert launch.exit_code_of({0: exit_codes.COLLECTIVE_TIMEOUT}) == 75
    assert launch.exit_code_of({0: exit_codes.CHECKPOINT_FAILED, 1: -9}) == 76
    assert launch.exit_code_of({0: -9}) == 1


FAKE_AGENT = """
import os, signal, subprocess, sys
count = os.path.join(sys.argv[1], "attempts")
n = int(open(count).read()) + 1 if os.path.exists(count) else 1
open(count, "w").write(str(n))
if n <= int(sys.argv[2]):  # a hung worker's timer: the worker, then the agent, SIGKILLed
    worker = subprocess.Popen(["sleep", "60"], start_new_session=True)
    open(os.path.join(sys.argv[1], f"worker{n}"), "w").write(str(worker.pid))
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(int(sys.argv[3]))
"""


@pytest.mark.parametrize("deaths, restarts, final, expected, attempts", [
    (0, 3, 0, 0, 1),
    (1, 3, exit_codes.PREEMPTED, exit_codes.PREEMPTED, 2),
    (9, 1, 0, exit_codes.COLLECTIVE_TIMEOUT, 2),
])
def test_a_node_starts_its_agent_again_after_a_hang_took_it_down(tmp_path, deaths, restarts,
                                                                 final, expected, attempts):
    cmd = [sys.executable, "-c", FAKE_AGENT, str(tmp_path), str(deaths), str(final)]
    assert launch.supervise(cmd, dict(os.environ), restarts=restarts) == expected
    assert int((tmp_path / "attempts").read_text()) == attempts
    for pid_file in tmp_path.glob("worker*"):  # orphaned workers do not outlive their agent
        pid = int(pid_file.read_text())
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_node_removes_its_temp_files_and_those_a_killed_one_left(tmp_path, monkeypatch):
    """A launcher's timer FIFO, prefork socket and pid files are gone when it ends; those of a
    launcher killed before its cleanup go when the next one starts; a running one's stay."""
    import tempfile

    from elastic_train.node.contract import TIMER_FILE_ENV

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    running = os.getppid()
    for pid in (dead.pid, running):
        (tmp_path / f"elastic-train-{pid}.sock").touch()
        (tmp_path / f"elastic-train-{pid}.timer").touch()
        (tmp_path / f"elastic-train-{pid}.sock.pids").mkdir()
        (tmp_path / f"elastic-train-{pid}.sock.pids" / "preloaded").touch()
    (tmp_path / "elastic-train-notes.txt").touch()  # not a launcher's: kept
    made = []

    def agent_making_its_files(cmd: list[str], env: dict[str, str], restarts: int) -> int:
        socket_path = env[PREFORK_SOCKET_ENV]
        for path in (socket_path, env[TIMER_FILE_ENV]):
            Path(path).touch()
        Path(f"{socket_path}.pids").mkdir()
        made.append(sorted(p.name for p in tmp_path.iterdir()))
        return 0

    monkeypatch.setattr(launch, "supervise", agent_making_its_files)
    monkeypatch.setattr(launch, "host_store", lambda host, port: None)
    env = _node_env(rank=0, nodes=1, BUCKET="file:///mnt/ckpt",
                    ELASTIC_TRAIN_NOTICE_FILE=str(tmp_path / "notice"))
    assert launch.run_node(env) == 0
    own = {f"elastic-train-{os.getpid()}{s}" for s in (".sock", ".timer", ".sock.pids")}
    kept = {f"elastic-train-{running}{s}" for s in (".sock", ".timer", ".sock.pids")}
    assert set(made[0]) == own | kept | {"elastic-train-notes.txt"}, "the dead one's swept"
    assert {p.name for p in tmp_path.iterdir()} == kept | {"elastic-train-notes.txt"}
