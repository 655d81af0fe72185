"""The job-group launch mode: `elastic-train sky render --mode group`, its offline checks with
SkyPilot 0.14.1's own job-group parser, config schema and strategy registry, the coordinator's
record, the group-mode launcher, and the chaos harness's group mode (`chaos.skygroup`), which
runs a rendered group YAML as SkyPilot would and checks the five invariants.

SkyPilot runs in one subprocess for the whole module, with a HOME of its own (`import sky` is
slow and creates `~/.sky`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from chaos import skygroup
from chaos.metrics import events
from chaos.scenario import ScenarioError
from elastic_train import exit_codes
from elastic_train.node import coordinator, launch, sky_render
from elastic_train.node.coordinator import Record, Records

ROOT = Path(__file__).resolve().parents[1]
GROUP_YAML = ROOT / "sky" / "train-group.yaml"
GROUP_SCENARIOS = ROOT / "chaos" / "scenarios" / "group"

pytest.importorskip("sky", reason="skypilot (the `sky` extra) is not installed")

RENDERS: dict[str, list[str]] = {
    "two_aws": ["--nodes", "2", "--accelerators", "A100:8", "--infra", "aws/us-east-1",
                "--bucket", "s3://b/et"],
    "four_gcp_zone_set": ["--nodes", "4", "--accelerators", "A100:8,H100:8", "--infra",
                          "gcp/us-central1/us-central1-a", "--bucket", "gs://b/et",
                          "--min-nodes", "2", "--run-name", "old", "--train-args=--steps=9"],
    "one_azure_on_demand": ["--nodes", "1", "--accelerators", "L4:1", "--infra",
                            "azure/eastus", "--bucket", "s3://b/et", "--on-demand",
                            "--max-restarts-on-errors", "5"],
}
CONFIGS: dict[str, dict[str, Any]] = {
    "empty": {},
    "shared": {"aws": {"security_group_name": "et-group"}, "azure": {"vpc_name": "et-vnet"},
               "gcp": {"vpc_name": "my-vpc"}},
    "per_cluster": {"aws": {"security_group_name": [{"w*": "workers"}, {"coord*": "coord"}]}},
    "wildcard": {"aws": {"security_group_name": [{"*": "et-all"}]}},
    "typo": {"aws": {"security_group_nam": "et"}},
}

OFFLINE = """
import json, sys
from elastic_train.node import sky_render
from chaos import skygroup
from sky.jobs import utils as jobs_utils
files, configs = json.loads(sys.argv[1])
out = {"files": {f: sky_render.check(f) for f in files},
       "configs": {c: sky_render.check_config(c) for c in configs},
       "strategies": sky_render.recovery_strategies(),
       "bad_strategy": sky_render.strategy_error("EAGER_NEXT_ZONE"),
       "poll_s": jobs_utils.JOB_STATUS_CHECK_GAP_SECONDS}
print(json.dumps(out, default=str))
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elastic-train")
    sky_render.register(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(argv: list[str]) -> tuple[int, str, str]:
    args = _parser().parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = args.func(args)
    return code, out.getvalue(), err.getvalue()


def _render(argv: list[str]) -> tuple[int, str, str]:
    return _run(["sky", "render", "--mode", "group", *argv])


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """SkyPilot's verdicts on the shipped and rendered group YAMLs, broken ones, and configs."""
    tmp = tmp_path_factory.mktemp("skygroup")
    files = [str(GROUP_YAML)]
    for case, argv in RENDERS.items():
        code, out, err = _render(argv)
        assert code == 0, err
        (tmp / f"{case}.yaml").write_text(out)
        files.append(str(tmp / f"{case}.yaml"))
    docs = list(yaml.safe_load_all(GROUP_YAML.read_text()))
    broken = {
        "bad_strategy": lambda d: d[2]["resources"]["job_recovery"].update(
            strategy="EAGER_NEXT_ZONE"),
        "duplicate_task": lambda d: d[3].update(name="w0"),
        "header_typo": lambda d: d[0].update(primary_task=["w0"]),
        "two_regions": lambda d: d[3]["resources"].update(infra="aws/us-west-2"),
        "ports": lambda d: d[1]["resources"].update(ports=29400),
    }
    for name, breaks in broken.items():
        copy = json.loads(json.dumps(docs))
        breaks(copy)
        (tmp / f"broken_{name}.yaml").write_text(yaml.safe_dump_all(copy))
        files.append(str(tmp / f"broken_{name}.yaml"))
    configs = []
    for name, cfg in CONFIGS.items():
        (tmp / f"config_{name}.yaml").write_text(yaml.safe_dump(cfg))
        configs.append(str(tmp / f"config_{name}.yaml"))
    home = tmp / "home"
    home.mkdir()
    proc = subprocess.run([sys.executable, "-c", OFFLINE, json.dumps([files, configs])],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    found["files"] = {Path(k).stem: v for k, v in found["files"].items()}
    found["configs"] = {Path(k).stem.removeprefix("config_"): v
                        for k, v in found["configs"].items()}
    return found


# ------------------------------------------------------------------ rendering, offline checks

def test_shipped_group_yaml_is_what_render_writes_for_two_nodes():
    args = _parser().parse_args(["sky", "render", "--mode", "group", "--nodes", "2",
                                 "--accelerators", "A100:8", "--infra", "aws/us-east-1"])
    expected = sky_render.to_group_yaml(sky_render.render_group(args, require_bucket=False))
    assert GROUP_YAML.read_text() == expected, "re-render sky/train-group.yaml"


@pytest.mark.parametrize("name", ["train-group", *RENDERS])
def test_group_yamls_pass_skypilots_job_group_parser(offline, name):
    result = offline["files"][name]
    assert result["errors"] == []
    group = result["group"]
    workers = [f"w{i}" for i in range(len(group["primary_tasks"]))]
    assert group["execution"] == "parallel" and group["inter_connection"] is False
    assert group["primary_tasks"] == workers, "the workers are the primary tasks"
    assert set(result["tasks"]) == {"coord", *workers}


@pytest.mark.parametrize("name", ["train-group", *RENDERS])
def test_group_tasks_one_region_spot_workers_on_demand_coordinator(offline, name):
    tasks = offline["files"][name]["tasks"]
    infras = {r["infra"] for t in tasks.values() for r in t["resources"]}
    assert len(infras) == 1 and len(infras.pop().split("/")) >= 2
    coord = tasks.pop("coord")
    assert coord["run"].strip() == "exec python -m elastic_train.node.coordinator"
    assert [r["use_spot"] for r in coord["resources"]] == [False]
    assert coord["resources"][0]["accelerators"] is None, "a CPU node"
    on_demand = name == "one_azure_on_demand"
    for task in tasks.values():
        assert task["num_nodes"] == 1
        assert task["run"].strip() == "exec python -m elastic_train.node.launch"
        assert task["envs"][launch.GROUP_NODES_ENV] == str(len(tasks))
        for r in task["resources"]:
            assert r["use_spot"] is not on_demand
            assert r["job_recovery"]["strategy"] == "FAILOVER"
            assert r["job_recovery"]["recover_on_exit_codes"] == [75, 76, 77]


def test_every_recovery_strategy_is_in_skypilots_registry(offline):
    strategies = set(offline["strategies"])
    assert {"FAILOVER", "EAGER_NEXT_REGION"} <= strategies
    for name in ["train-group", *RENDERS]:
        for task in offline["files"][name]["tasks"].values():
            for r in task["resources"]:
                assert r["job_recovery"]["strategy"] in strategies
    assert "EAGER_NEXT_ZONE" in offline["bad_strategy"]


@pytest.mark.parametrize("name, message", [
    ("bad_strategy", "'EAGER_NEXT_ZONE' is not one of"),
    ("duplicate_task", "Duplicate job name"),
    ("header_typo", "primary_task"),
    ("two_regions", "one cloud/region"),
    ("ports", "resources.ports opens"),
])
def test_check_catches_a_broken_group(offline, name, message):
    assert message in " ".join(offline["files"][f"broken_{name}"]["errors"])


def test_no_task_opens_ports():
    for doc in yaml.safe_load_all(GROUP_YAML.read_text()):
        assert "ports" not in (doc.get("resources") or {}), "the store must stay private"


def test_simulated_controller_polls_as_skypilots(offline):
    assert skygroup.JOB_STATUS_CHECK_GAP_S == offline["poll_s"]


def test_config_check_says_per_cloud_what_private_traffic_needs(offline):
    errors, lines = offline["configs"]["empty"]
    assert errors == [] and set(lines) == {"aws", "gcp", "azure", "kubernetes"}
    assert lines["aws"].startswith("missing") and "aws.security_group_name" in lines["aws"]
    assert lines["azure"].startswith("missing") and "azure.vpc_name" in lines["azure"]
    assert lines["gcp"].startswith("ok") and lines["kubernetes"].startswith("ok")
    errors, lines = offline["configs"]["shared"]
    assert errors == [] and lines["aws"].startswith("ok") and lines["azure"].startswith("ok")
    assert lines["gcp"].startswith("check") and "my-vpc" in lines["gcp"]
    assert offline["configs"]["per_cluster"][1]["aws"].startswith("missing"), \
        "coordinator and workers in different groups cannot talk"
    assert offline["configs"]["wildcard"][1]["aws"].startswith("ok")


def test_config_check_rejects_a_typo_with_skypilots_schema_in_one_line(offline):
    errors, lines = offline["configs"]["typo"]
    assert len(errors) == 1 and "security_group_nam" in errors[0] and lines == {}


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "2", "--accelerators", "A100:8", "--bucket", "s3://b/x"], "--infra=(none)"),
    (["--nodes", "2", "--accelerators", "A100:8", "--bucket", "s3://b/x", "--infra", "aws"],
     "--infra=aws"),
    (["--nodes", "2", "--accelerators", "A100:8", "--bucket", "s3://b/x", "--infra",
      "aws/us-east-1", "--infra", "gcp/us-central1"], "once"),
    (["--nodes", "2", "--accelerators", "A100:8", "--bucket", "s3://b/x", "--infra",
      "kubernetes/ctx"], "--mode cluster"),
    (["--nodes", "0", "--accelerators", "A100:8", "--bucket", "s3://b/x", "--infra",
      "aws/us-east-1"], "--nodes=0"),
])
def test_render_group_refuses_what_cannot_run_with_one_line(argv, message):
    code, out, err = _render(argv)
    assert code == exit_codes.BAD_CONFIG and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


def test_check_needs_files_or_a_config():
    code, _, err = _run(["sky", "check"])
    assert code == exit_codes.BAD_CONFIG and "--config" in err


# ----------------------------------------------------------------- the coordinator's record

def test_records_take_the_newest_epoch_and_never_trust_a_stale_one(tmp_path):
    uri = f"file://{tmp_path}/run"
    first = Records(uri, "7").publish("10.0.0.5:29400")
    second = Records(uri, "7").publish("10.0.0.9:29400")
    assert (first.epoch, second.epoch) == (1, 2)
    reader = Records(uri, "7")
    assert reader.newest() == second
    assert Records(uri, "7").superseded(first) and not Records(uri, "7").superseded(second)
    # The newer record vanishes from a listing: the reader does not fall back to epoch 1.
    (tmp_path / "run" / "coordinator" / "7" / "epoch-00000002.json").unlink()
    assert reader.newest() is None
    assert Records(uri, "7").newest() == first, "a fresh reader knows no better"
    assert Records(uri, "8").newest() is None, "another managed job's coordinator is not ours"


def test_a_record_that_is_not_this_jobs_is_ignored(tmp_path):
    records = Records(f"file://{tmp_path}/run", "7")
    records.rewrite(Record(epoch=3, address="10.0.0.1:1", job_id="8"))
    assert records.newest() is None


def _group_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "SKYPILOT_NODE_IPS": "127.0.0.1\n", "SKYPILOT_NODE_RANK": "0", "SKYPILOT_NUM_NODES": "1",
        "SKYPILOT_NUM_GPUS_PER_NODE": "0", "SKYPILOT_MANAGED_JOB_ID": "7",
        "SKYPILOT_JOBGROUP_NAME": "et", "SKYPILOT_TASK_ID": "sky-managed-x_et_w1_7-2",
        "BUCKET": f"file://{tmp_path}", "RUN_NAME": "", "MIN_NODES": "1",
        "GROUP_NODES": "3", "RDZV_PORT": "0", **extra,
    }


def test_a_coordinator_publishes_its_store_and_leaves_once_superseded(tmp_path, monkeypatch):
    monkeypatch.setattr(coordinator, "REFRESH_S", 0.05)
    env = _group_env(tmp_path)
    records = Records(f"file://{tmp_path}/runs/et-7", "7")
    results: list[int] = []
    first = threading.Thread(target=lambda: results.append(coordinator.run_coordinator(env)))
    first.start()
    try:
        record = _wait_for(records.newest)
        assert record.epoch == 1 and record.address.startswith("127.0.0.1:")
        assert coordinator.reachable(record.address)
        stop = threading.Event()
        second = threading.Thread(target=coordinator.run_coordinator, args=(env, stop))
        second.start()
        newer = _wait_for(lambda: (r := records.newest()) and r.epoch == 2 and r)
        first.join(timeout=10)
        assert results == [exit_codes.OK], "the superseded coordinator left"
        assert newer.address != record.address and coordinator.reachable(newer.address)
        stop.set()
        second.join(timeout=10)
    finally:
        records.publish("127.0.0.1:1")  # ends the first one if the test failed early
        first.join(timeout=10)


def _wait_for(fn: Any, timeout_s: float = 20.0) -> Any:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {fn}")


def test_a_coordinator_refuses_a_bad_environment_with_one_line(tmp_path, capsys):
    env = _group_env(tmp_path)
    del env["SKYPILOT_MANAGED_JOB_ID"]
    assert coordinator.run_coordinator(env) == exit_codes.BAD_CONFIG
    err = capsys.readouterr().err
    assert "SKYPILOT_MANAGED_JOB_ID" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------- the group-mode launcher

def test_group_worker_runs_torchrun_against_the_coordinators_store(tmp_path):
    env = _group_env(tmp_path, MIN_NODES="2", TRAIN_ARGS="--steps=5")
    node = launch.Node.from_env(env)
    task = coordinator.GroupTask.from_env(env)
    args = launch.agent_command(node, env, "10.0.0.9:41000", task.run_id, 3).torchrun_args()
    assert task.run_id == "et-7", "shared by every task: the managed job id, not the task id"
    assert "--nnodes=2:3" in args and "--rdzv-endpoint=10.0.0.9:41000" in args
    assert "--rdzv-id=et-7" in args and "--local-addr=127.0.0.1" in args
    assert f"--checkpoint.uri=file://{tmp_path}/runs/et-7" in args


@pytest.mark.parametrize("change, message", [
    ({"SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_IPS": "a\nb\n"}, "each worker task"),
    ({"SKYPILOT_MANAGED_JOB_ID": ""}, "SKYPILOT_MANAGED_JOB_ID is not set"),
    ({"GROUP_NODES": "x"}, "GROUP_NODES='x'"),
    ({"MIN_NODES": "4"}, "MIN_NODES=4"),
])
def test_group_worker_refuses_a_bad_environment_with_exit_2(tmp_path, change, message, capsys):
    assert launch.run_node(_group_env(tmp_path, **change)) == exit_codes.BAD_CONFIG
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_group_worker_gives_up_when_no_coordinator_answers(tmp_path):
    records = Records(f"file://{tmp_path}/run", "7")
    records.publish("127.0.0.1:1")  # nothing listens there
    found = launch.Coordinator(records, lambda e: None, {}, wait_s=0.2, poll_s=0.05)
    with pytest.raises(launch.LaunchError, match="no reachable coordinator"):
        found.find()


FAKE_AGENT = """
import os, sys
count = os.path.join(sys.argv[1], "starts")
n = int(open(count).read()) + 1 if os.path.exists(count) else 1
open(count, "w").write(str(n))
sys.exit(1 if n == 1 else 0)
"""


def test_an_agent_that_lost_its_store_starts_again_at_the_new_coordinator(tmp_path):
    """The first agent ends while its coordinator is gone and a new one has published; the
    launcher reads the record again and starts the next agent against the new address, outside
    the restart budget (0 here)."""
    from torch.distributed import TCPStore

    records = Records(f"file://{tmp_path}/run", "7")
    stores = {"old": TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)}
    records.publish(f"127.0.0.1:{stores['old'].port}")
    endpoints: list[str] = []

    class Agent:
        def __init__(self, endpoint: str) -> None:
            endpoints.append(endpoint)
            if len(endpoints) == 1:  # the coordinator is lost; a new one comes up elsewhere
                del stores["old"]
                stores["new"] = TCPStore("127.0.0.1", 0, is_master=True,
                                         wait_for_workers=False)
                records.publish(f"127.0.0.1:{stores['new'].port}")

        def argv(self) -> list[str]:
            return [sys.executable, "-c", FAKE_AGENT, str(tmp_path)]

        def env(self, base: dict[str, str]) -> dict[str, str]:
            return dict(os.environ)

    found = launch.Coordinator(records, Agent, {}, wait_s=10, poll_s=0.05)  # type: ignore[arg-type]
    assert launch.supervise([], {}, restarts=0, coordinator=found) == exit_codes.OK
    assert (tmp_path / "starts").read_text() == "2"
    assert endpoints == [endpoints[0], f"127.0.0.1:{stores['new'].port}"]
    assert endpoints[0] != endpoints[1]


# --------------------------------------------------------------- the harness's group mode

TOY_GROUP = """\
name: toy
execution: parallel
primary_tasks: [w0, w1]
termination_delay: 0s
---
name: coord
run: |
  env | grep ^SKYPILOT_ | sort > "$HOME/../../../env-$SKYPILOT_TASK_ID"
  echo $HOME >> "$HOME/../../../homes"
  exec sleep 600
---
name: w0
resources: {job_recovery: {strategy: FAILOVER, max_restarts_on_errors: 1,
            recover_on_exit_codes: [77]}}
run: |
  env | grep ^SKYPILOT_ | sort > "$HOME/../../../env-$SKYPILOT_TASK_ID"
  echo $HOME >> "$HOME/../../../homes"
  test -e "$HOME/../../../stop" && exit 0
  exec sleep 600
---
name: w1
resources: {job_recovery: {strategy: FAILOVER, max_restarts_on_errors: 0}}
run: |
  env | grep ^SKYPILOT_ | sort > "$HOME/../../../env-$SKYPILOT_TASK_ID"
  echo $HOME >> "$HOME/../../../homes"
  exit 3
"""


def _launches(group: skygroup.SkyGroup, name: str) -> list[dict[str, Any]]:
    return [e for e in group.events if e["task"] == name and e["event"] == "launched"]


def test_group_tasks_get_skypilots_variables_and_only_the_lost_task_is_relaunched(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(TOY_GROUP)
    tasks = tmp_path / "tasks"

    def started(home: str) -> int:  # how often a run: began on that cluster's HOME
        lines = (tasks / "homes").read_text().split() if (tasks / "homes").exists() else []
        return lines.count(str(tasks / "w0" / home / "home"))

    with skygroup.SkyGroup(path, {}, {}, tasks, recovery_delay_s=0.3,
                           restart_delay_s=0.1) as group:
        _wait_for(lambda: group.statuses()["w1"] == "FAILED" and started("cluster1") == 1)
        group.preempt("w0")
        _wait_for(lambda: started("cluster2") == 1)
        group.kill("w0")  # same cluster, counted against max_restarts_on_errors (1)
        _wait_for(lambda: started("cluster2") == 2)
        (tasks / "stop").touch()
        group.kill("w0")  # the budget is spent: FAILED, the group ends, coord is cancelled
        assert group.wait(20)
        _wait_for(lambda: group.statuses()["coord"] == "CANCELLED")
        statuses = group.statuses()
    assert statuses == {"coord": "CANCELLED", "w0": "FAILED", "w1": "FAILED"}
    assert [e["cluster"] for e in _launches(group, "w0")] == [1, 2, 2], \
        "a preemption gives a new cluster, a crash the same one"
    assert len(_launches(group, "coord")) == 1 and len(_launches(group, "w1")) == 1, \
        "only the lost task was re-launched"
    envs = {}
    for f in (tmp_path / "tasks").glob("env-*"):
        envs[f.name] = dict(line.split("=", 1) for line in f.read_text().splitlines())
    assert len(envs) == 3, "a distinct SKYPILOT_TASK_ID per task"
    assert {e["SKYPILOT_MANAGED_JOB_ID"] for e in envs.values()} == {group.job_id}
    assert {e["SKYPILOT_NUM_NODES"] for e in envs.values()} == {"1"}
    assert {e["SKYPILOT_NODE_RANK"] for e in envs.values()} == {"0"}
    assert {e["SKYPILOT_JOBGROUP_NAME"] for e in envs.values()} == {"toy"}
    assert not group.tagged()


def test_group_scenarios_validate_and_against_the_shared_contract():
    from chaos.scenario import schema

    paths = sorted(GROUP_SCENARIOS.glob("*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        scenario = skygroup.load_scenario(path)
        assert scenario.faults, path
        jsonschema.validate(yaml.safe_load(path.read_text()), schema("scenario"))


@pytest.mark.parametrize("change, message", [
    ({"nodes": 0}, "nodes=0"),
    ({"workers": 2}, "unknown key 'workers'"),
    ({"faults": [{"kind": "kill_node", "at_step": 3}]}, "kind 'kill_node'"),
    ({"faults": [{"kind": "kill_task", "at_step": 3, "task": "w5"}]}, "task='w5'"),
    ({"faults": [{"kind": "kill_task", "at_step": 99, "task": "w0"}]}, "not before"),
])
def test_bad_group_scenarios_fail_with_one_line(change, message):
    base = {"name": "g", "nodes": 2, "train": {"steps": 20}}
    with pytest.raises(ScenarioError) as e:
        skygroup.scenario_from_dict({**base, **change})
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("finished, ok, code", [(True, True, 0), (True, False, 1),
                                                 (False, True, 1)])
def test_chaos_run_runs_a_group_scenario_in_group_mode(tmp_path, monkeypatch, capsys, finished,
                                                        ok, code):
    from chaos import cli as chaos_cli

    ran: list[str] = []

    def fake_run(scenario, out, timeout_s, log):
        ran.append(scenario.name)
        report = {"finished": finished,
                  "invariants": {"completed": {"ok": ok, "detail": "reached step 80"}}}
        return skygroup.GroupRun(report, [], [])

    monkeypatch.setattr(skygroup, "run_scenario", fake_run)
    parser = argparse.ArgumentParser()
    chaos_cli.register(parser.add_subparsers(dest="command"))
    scenario = str(GROUP_SCENARIOS / "worker-lost.yaml")
    args = parser.parse_args(["chaos", "run", scenario, "--out", str(tmp_path / "out")])
    assert args.func(args) == code and ran == ["group-worker-lost"]
    assert "completed" in capsys.readouterr().out
    # The cluster harness's own options mean nothing there: one line, nothing run.
    args = parser.parse_args(["chaos", "run", scenario, "--out", str(tmp_path / "out"),
                              "--random-faults", "4"])
    assert args.func(args) == 2 and ran == ["group-worker-lost"]
    assert "--random-faults: not for a group scenario" in capsys.readouterr().err


# ----------------------------------------------------------------- chaos: real group runs

@pytest.fixture(scope="module")
def chaos_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chaos-cache")


def _group_run(name: str, tmp_path: Path, cache: Path) -> skygroup.GroupRun:
    scenario = skygroup.load_scenario(GROUP_SCENARIOS / f"{name}.yaml")
    run = skygroup.run_scenario(scenario, tmp_path / "out", cache, timeout_s=400,
                                log=lambda m: None)
    rep = run.report
    failed = {k: v["detail"] for k, v in rep["invariants"].items() if not v["ok"]}
    logs = "" if not failed else textwrap.shorten(
        (tmp_path / "out" / "report.json").read_text(), 4000)
    assert rep["finished"] and not failed, f"{failed}\n{logs}"
    assert not rep["faults_not_fired"]
    assert all(codes[-1] == 0 for task, codes in rep["exit_codes"].items() if task != "coord")
    return run


def _regrown_from_a_save_for_the_join(run: skygroup.GroupRun, task: str) -> None:
    """The world ends at 2 again, restored from the newest commit. When the survivors trained
    alone in between (the usual case), that commit was saved after the replacement was launched:
    the joiner waited for a save instead of rolling the world back to an older commit. A
    replacement that is back before the survivors' re-form completes (the lost node's keep-alive
    has not lapsed yet) re-forms with them from the newest commit, which is as good. (How many
    steps the world trained between that save and the re-form is a timing figure:
    bench/group.py.)"""
    records = run.records
    worlds = [int(r["world_size"]) for r in events(records, "start")]
    assert worlds[-1] == 2, worlds
    relaunched = [e["wall"] for e in run.events if e["event"] == "launched"
                  and e["task"] == task][1]
    grown = max(i for i, r in enumerate(records) if r.get("event") == "start"
                and int(r["world_size"]) == 2)
    newest = events(records[:grown], "commit")[-1]
    assert int(records[grown]["restored_step"]) == int(newest["step"])
    if 1 in worlds:
        assert float(newest["time"]) > relaunched, \
            "saved for the join, after the replacement came"


def _relaunched_only(run: skygroup.GroupRun, name: str) -> None:
    launched = [e["task"] for e in run.events if e["event"] == "launched"]
    assert launched.count(name) == 2
    assert all(launched.count(t) == 1 for t in set(launched) - {name})


def _noticed_step_was_committed(run: skygroup.GroupRun, task: str) -> None:
    notices = events(run.records, "notice")
    assert notices, "the notice reached the trainer"
    assert int(notices[0]["step"]) in [int(r["step"]) for r in events(run.records, "commit")]


def _first_run_was_killed(run: skygroup.GroupRun, task: str) -> None:
    assert run.report["exit_codes"]["w0"][0] == 137, "restarted after SIGKILL, on its cluster"


@pytest.mark.chaos
@pytest.mark.timeout(900)
@pytest.mark.parametrize("scenario, task, checks", [
    # Preempted without notice: frozen, re-launched on a new cluster, joins after a save.
    ("worker-lost", "w1", (_regrown_from_a_save_for_the_join,)),
    # With notice: save, leave (77). Its replacement often comes after the last step: it finds
    # the rendezvous closed and the final weights written, and exits 0 (its task succeeds;
    # `_group_run` checks every worker task's last exit code).
    ("worker-noticed", "w1", (_noticed_step_was_committed,)),
    # Every process dies, the node stays: restarted on its cluster, joins again.
    ("worker-killed", "w0", (_regrown_from_a_save_for_the_join, _first_run_was_killed)),
])
def test_a_lost_worker_task_is_replaced_alone_and_rejoins(tmp_path, chaos_cache, scenario, task,
                                                           checks):
    run = _group_run(scenario, tmp_path, chaos_cache)
    _relaunched_only(run, task)
    for check in checks:
        check(run, task)


@pytest.mark.chaos
@pytest.mark.timeout(900)
def test_group_coordinator_lost_is_found_again_at_its_new_address(tmp_path, chaos_cache):
    run = _group_run("coordinator-lost", tmp_path, chaos_cache)
    _relaunched_only(run, "coord")
    records = Records(run.report["run_uri"], "1")
    logs = "\n".join(p.read_text() for p in (tmp_path / "out" / "tasks").glob("w*.log"))
    epochs = [line for line in logs.splitlines() if "coordinator epoch" in line]
    assert {line.split(" at ")[0].split()[-1] for line in epochs} == {"1", "2"}
    assert len({line.split(" at ")[1] for line in epochs}) == 2, "a new address"
    del records
    commits = [int(r["step"]) for r in events(run.records, "commit")]
    restores = [r["restored_step"] for r in events(run.records, "start")[1:]]
    assert restores and all(s in commits for s in restores), "resumed from a commit"


@pytest.mark.parametrize("infra,mode,expected", [
    (["aws/us-east-1"], None, "group"),
    (["gcp/us-central1/us-central1-a"], None, "group"),
    (["kubernetes/my-context"], None, "cluster"),
    (["aws"], None, "cluster"),
    (["aws/us-east-1", "gcp/us-central1"], None, "cluster"),
    (None, None, "cluster"),
    (["aws/us-east-1"], "cluster", "cluster"),
])
def test_render_defaults_to_a_job_group_on_one_vm_region(infra, mode, expected):
    import argparse

    from elastic_train.node.sky_render import default_mode

    assert default_mode(argparse.Namespace(infra=infra, mode=mode)) == expected


ORPHAN_GROUP = """\
name: orphan
execution: parallel
primary_tasks: [w0]
termination_delay: 0s
---
name: coord
run: exec sleep 600
---
name: w0
run: |
  {leave}
  exit 0
"""


@pytest.mark.parametrize("leave, orphans", [("true", 0), ("setsid sleep 600 &", 1)])
def test_a_process_that_outlives_its_task_is_found_before_the_group_is_torn_down(
        tmp_path, leave, orphans):
    """What `no_orphans` reads in group mode: a worker's process left running after its task
    ended is seen, not killed unseen by the teardown; the cancelled coordinator's are not."""
    path = tmp_path / "orphan.yaml"
    path.write_text(ORPHAN_GROUP.format(leave=leave))
    with skygroup.SkyGroup(path, {}, {}, tmp_path / "tasks") as group:
        assert group.wait(20)
        left = [skygroup._describe(p) for p in group.outlived(timeout_s=5)]
        assert group.statuses() == {"coord": "CANCELLED", "w0": "SUCCEEDED"}
    assert len(left) == orphans and all("sleep 600" in p for p in left), left
    assert skygroup.invariants.no_orphans(left).ok == (not orphans)
    assert not group.tagged()


def test_a_group_run_starts_from_an_out_dir_cleared_of_the_previous_runs_results(tmp_path):
    """A second `chaos run` of a group scenario into the same --out must not check the first
    run's metrics as its own; files that are not a run's own stay."""
    out = tmp_path / "out"
    (out / "run").mkdir(parents=True)
    (out / "run" / "metrics.jsonl").write_text('{"step": 80, "world_size": 2}\n')
    (out / "tasks" / "w0").mkdir(parents=True)
    (out / "report.json").write_text("{}")
    (out / "group.yaml").write_text("name: old\n")
    (out / "notes.txt").write_text("mine")
    skygroup.clean_out(out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
