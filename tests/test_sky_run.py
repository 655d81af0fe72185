"""The `run:` section of sky/train.yaml, executed unchanged on local "nodes" under the SKYPILOT_*
variables SkyPilot sets (every node IP 127.0.0.1), against real GCS and S3 API servers on
loopback; checked with the chaos harness's invariants against its fault-free reference run.

1. A node is killed mid-run: the other trains on in a smaller world to the end.
2. Preemption, then resuming anywhere: on S3, the YAML's preemption hook gives one node a notice
   (it saves and leaves with exit code 77, which `recover_on_exit_codes` lists); then the run is
   stopped entirely (every node killed); its checkpoints are copied to GCS with
   `elastic-train ckpt copy`, and a new cluster (other node count, empty homes and caches, new
   task id and so new rendezvous id) resumes from the copy and finishes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from chaos import harness, invariants
from chaos.cluster import NODE_ENV, TAG_ENV
from chaos.metrics import MetricsTail, Record, events, step_records
from chaos.scenario import from_dict
from chaos.services import GcsEmulator, MotoS3Server, free_port
from elastic_train import exit_codes
from elastic_train.node import procs

pytestmark = pytest.mark.chaos

ROOT = Path(__file__).resolve().parents[1]
TRAIN_YAML = ROOT / "sky" / "train.yaml"
STEPS = 30
SCENARIO = from_dict({
    "name": "sky-run", "seed": 0, "nodes": 2, "min_nodes": 1, "max_nodes": 2,
    "procs_per_node": 1, "storage": "s3",
    "train": {"model": "tiny", "steps": STEPS, "checkpoint.every": 10},
})
"""Only for the harness's reference run (world 2) and its trainer overrides; the faults are ours."""


class SkyNodes:
    """A task YAML's `run:` run once per local node, the way SkyPilot runs it on a cluster: in
    the workdir, under the task's `envs` and SKYPILOT_NODE_RANK / SKYPILOT_NODE_IPS /
    SKYPILOT_NUM_NODES / SKYPILOT_NUM_GPUS_PER_NODE / SKYPILOT_TASK_ID / SKYPILOT_CLUSTER_INFO.

    Each node gets a HOME of its own (its notice file, its caches: an empty machine). A node's
    death kills its shell and every descendant; `close()` kills what is left, found through the
    process tree and the chaos tag every node process inherits."""

    def __init__(self, yaml_path: Path, num_nodes: int, envs: dict[str, str], extra_env: dict[
            str, str], workdir: Path, task_id: str | None = None) -> None:
        task = yaml.safe_load(yaml_path.read_text())
        self.run = task["run"]
        self.hooks = (task.get("config") or {}).get("hooks") or []
        self.envs = {**{k: v for k, v in (task.get("envs") or {}).items()}, **envs}
        missing = [k for k, v in self.envs.items() if v is None]
        assert not missing, f"required envs not given: {missing}"
        self.num_nodes = num_nodes
        self.extra_env = extra_env
        self.workdir = workdir
        self.task_id = task_id or f"sky-managed-test_{uuid.uuid4().hex[:8]}_1-0"
        self.tag = uuid.uuid4().hex[:12]
        self.shells: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> SkyNodes:
        self.workdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        ips = "\n".join(["127.0.0.1"] * self.num_nodes) + "\n"
        for rank in range(self.num_nodes):
            home = self.workdir / f"home{rank}"
            home.mkdir()
            env = {
                **os.environ, **self.extra_env, **{k: str(v) for k, v in self.envs.items()},
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                "HOME": str(home),
                "SKYPILOT_NODE_RANK": str(rank),
                "SKYPILOT_NODE_IPS": ips,
                "SKYPILOT_NUM_NODES": str(self.num_nodes),
                "SKYPILOT_NUM_GPUS_PER_NODE": "0",
                "SKYPILOT_TASK_ID": self.task_id,
                "SKYPILOT_CLUSTER_INFO": json.dumps({"cloud": "local", "region": "loopback",
                                                     "zone": None, "num_nodes": self.num_nodes}),
                "RDZV_PORT": str(port),
                "OMP_NUM_THREADS": "1",
                TAG_ENV: self.tag, NODE_ENV: str(rank),
            }
            env.pop("ELASTIC_TRAIN_NOTICE_FILE", None)
            with open(self.workdir / f"node{rank}.log", "ab") as log:
                self.shells.append(subprocess.Popen(
                    ["bash", "-c", self.run], cwd=ROOT, env=env, stdout=log,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True))
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def kill_node(self, rank: int) -> None:
        procs.kill_tree(self.shells[rank], {TAG_ENV: self.tag, NODE_ENV: str(rank)})

    def run_hook(self, rank: int, event: str) -> None:
        """Run the YAML's `config.hooks` for `event` on a node, as skylet would (without their
        closing `sleep`, which only holds a Kubernetes pod's grace period open)."""
        for hook in self.hooks:
            if event in hook.get("events", []):
                script = "\n".join(line for line in hook["run"].splitlines()
                                   if not line.strip().startswith("sleep "))
                subprocess.run(["bash", "-c", script], check=True, timeout=30,
                               env={**os.environ, "HOME": str(self.workdir / f"home{rank}"),
                                    "SKYPILOT_HOOK_EVENT": event})

    def wait(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(p.poll() is not None for p in self.shells):
                return True
            time.sleep(0.2)
        return False

    def exit_codes(self) -> list[int | None]:
        return [p.poll() for p in self.shells]

    def tagged(self) -> list[psutil.Process]:
        return procs.tagged({TAG_ENV: self.tag})

    def close(self) -> None:
        for rank in range(len(self.shells)):
            self.kill_node(rank)
        procs.kill(self.tagged())

    def logs(self) -> str:
        return "\n".join(f"--- node{r}.log\n" + (self.workdir / f"node{r}.log").read_text()[-3000:]
                         for r in range(len(self.shells)))


def in_subprocess(code: str, env: dict[str, str], timeout_s: float = 120) -> str:
    """Run Python `code` with the storage client environment `env` and return its stdout.
    A subprocess: fsspec reads FSSPEC_* at import, and gcsfs must see
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT before it is imported."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=ROOT, timeout=timeout_s)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@contextlib.contextmanager
def object_store(kind: str) -> Iterator[tuple[str, dict[str, str]]]:
    """(bucket URI, client environment) of a fresh bucket on a loopback S3 or GCS server, with
    the embedded corpus prepared at `{bucket}/data`. The server stops on exit."""
    server = MotoS3Server() if kind == "s3" else GcsEmulator()
    scheme = "s3" if kind == "s3" else "gs"
    name = f"sky-{uuid.uuid4().hex[:8]}"
    with server:
        env = server.env()
        in_subprocess(
            "import fsspec\nfrom elastic_train import data\n"
            f"fsspec.filesystem({scheme!r}).mkdir({name!r})\n"
            f"data.prepare('{scheme}://{name}/data')\n", env)
        yield f"{scheme}://{name}", env


def train_args(run_dir: Path, cache_dir: Path) -> str:
    """TRAIN_ARGS: the harness's trainer overrides (so the reference applies) + local dirs."""
    overrides = {**harness.train_overrides(SCENARIO), "run.dir": str(run_dir),
                 "checkpoint.cache_dir": str(cache_dir)}
    return shlex.join(f"--{k}={v}" for k, v in overrides.items())


def wait_for(tail: MetricsTail, nodes: SkyNodes, predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tail.poll()
        if predicate(tail.records):
            return
        if all(code is not None for code in nodes.exit_codes()):
            break
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting; exit codes {nodes.exit_codes()}\n{nodes.logs()}")


def committed_steps(uri: str, env: dict[str, str]) -> tuple[list[int], dict[int, list]]:
    """The committed steps under `uri` and, for each, [ok, detail] of verifying it."""
    out = in_subprocess(
        "import json\nfrom checkpointing import CheckpointManager\n"
        f"m = CheckpointManager({uri!r})\n"
        "steps = [i.step for i in m.steps()]\n"
        "res = {s: [bool(r.ok), str(r.detail)] for s in steps for r in [m.verify(s)]}\n"
        "m.close()\nprint(json.dumps({'steps': steps, 'verdicts': res}))\n", env)
    found = json.loads(out.strip().splitlines()[-1])
    return found["steps"], {int(k): v for k, v in found["verdicts"].items()}


def check_invariants(records: list[Record], run_dir: Path, uri: str, env: dict[str, str],
                     ref: harness.Reference, survivors: list[psutil.Process]) -> dict[str, Any]:
    committed, verdicts = committed_steps(uri, env)
    final_model = run_dir / "final_model.pt"
    changed = invariants.world_changed(records, ref.world_size)
    return {
        "completed": invariants.completed(records, STEPS, final_model),
        "exactly_once": invariants.exactly_once(records, ref.consumed, STEPS),
        "weights_match_reference": invariants.weights_match(final_model, ref.final_model,
                                                            changed),
        "checkpoints_verified": invariants.checkpoints_verified(records, committed,
                                                                lambda s: tuple(verdicts[s])),
        "no_orphans": invariants.no_orphans(f"{p.pid}" for p in survivors),
    }


def assert_all_ok(checks: dict[str, invariants.Verdict], logs: str) -> None:
    failed = {k: v.detail for k, v in checks.items() if not v.ok}
    assert not failed, f"{failed}\n{logs}"


@pytest.fixture(scope="module")
def reference() -> harness.Reference:
    cache = harness.default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    return harness.reference(SCENARIO, cache, log=lambda m: None)


def test_run_section_trains_through_a_node_kill(reference, tmp_path):
    run_dir = tmp_path / "run"
    with object_store("gcs") as (bucket, env):  # the resume test starts on S3
        task_id = f"sky-managed-test_{uuid.uuid4().hex[:8]}_1-0"
        uri = f"{bucket}/runs/{task_id}"  # RUN_NAME is empty: the task id names the run
        envs = {"BUCKET": bucket, "DATA_URI": f"{bucket}/data", "MIN_NODES": "1",
                "TRAIN_ARGS": train_args(run_dir, tmp_path / "cache")}
        with SkyNodes(TRAIN_YAML, 2, envs, env, tmp_path / "nodes", task_id) as nodes:
            tail = MetricsTail(run_dir / "metrics.jsonl")
            # Between saves: a kill during an upload is the chaos harness's own fault kind.
            wait_for(tail, nodes, lambda rs: events(rs, "commit") and any(
                int(r["step"]) >= 12 for r in step_records(rs)), timeout_s=120)
            nodes.kill_node(1)
            finished = nodes.wait(timeout_s=150)
            codes = nodes.exit_codes()
            logs = nodes.logs()
        survivors = nodes.tagged()
        tail.poll()
        records = tail.records
        assert finished and codes[0] == 0, f"exit codes {codes}\n{logs}"
        checks = check_invariants(records, run_dir, uri, env, reference, survivors)
    assert_all_ok(checks, logs)
    worlds = [int(r["world_size"]) for r in step_records(records)]
    assert worlds[0] == 2 and worlds[-1] == 1, "the survivor finished alone, in a smaller world"


def test_preempted_run_resumes_from_a_copy_in_another_cloud_on_a_new_cluster(reference, tmp_path):
    run_a, run_b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    with contextlib.ExitStack() as gcs_stack:
        gcs, gcs_env = gcs_stack.enter_context(object_store("gcs"))
        dst = f"{gcs}/runs/first"
        with object_store("s3") as (s3, s3_env):
            src = f"{s3}/runs/first"
            envs = {"BUCKET": s3, "RUN_NAME": "first", "DATA_URI": f"{s3}/data", "MIN_NODES": "1",
                    "TRAIN_ARGS": train_args(run_a, tmp_path / "a" / "cache")}
            with SkyNodes(TRAIN_YAML, 2, envs, s3_env, tmp_path / "a" / "nodes") as nodes:
                tail_a = MetricsTail(run_a / "metrics.jsonl")
                wait_for(tail_a, nodes, lambda rs: events(rs, "commit") and any(
                    int(r["step"]) >= 12 for r in step_records(rs)), timeout_s=120)
                # Node 1 gets a preemption notice through the YAML's own hook: it saves and
                # leaves with the exit code that recover_on_exit_codes lists; node 0 goes on.
                nodes.run_hook(1, "preemption")
                wait_for(tail_a, nodes, lambda rs: nodes.exit_codes()[1] is not None, 60)
                left_with = nodes.exit_codes()[1]
                nodes.kill_node(0)  # then the whole cluster is gone: no notice, no final save
                logs_a = nodes.logs()
            survivors = nodes.tagged()
            tail_a.poll()
            copy = subprocess.run(
                [sys.executable, "-m", "elastic_train.cli", "ckpt", "copy", src, dst],
                capture_output=True, text=True, timeout=120, cwd=ROOT,
                env={**os.environ, **s3_env, **gcs_env})
            assert copy.returncode == 0, copy.stdout + copy.stderr
        # The S3 server is gone now: the new cluster (new task id) can only read GCS.
        envs = {"BUCKET": gcs, "RUN_NAME": "first", "DATA_URI": f"{gcs}/data", "MIN_NODES": "1",
                "TRAIN_ARGS": train_args(run_b, tmp_path / "b" / "cache")}
        with SkyNodes(TRAIN_YAML, 1, envs, gcs_env, tmp_path / "b" / "nodes") as nodes:
            finished = nodes.wait(timeout_s=180)
            codes = nodes.exit_codes()
            logs = nodes.logs()
        survivors += nodes.tagged()
        tail_b = MetricsTail(run_b / "metrics.jsonl")
        tail_b.poll()
        assert finished and codes == [0], f"exit codes {codes}\n{logs}"
        # The run's history across both clusters: the lineage rolls back at B's `start`.
        records = tail_a.records + tail_b.records
        checks = check_invariants(records, run_b, dst, gcs_env, reference, survivors)
    assert left_with == exit_codes.PREEMPTED, f"node 1 exited {left_with}\n{logs_a}"
    notices = events(tail_a.records, "notice")
    assert notices, "the hook's notice reached the trainer"
    noticed_at = int(notices[0]["step"])
    assert any(int(r["step"]) == noticed_at for r in events(tail_a.records, "commit")), \
        "the noticed step was committed before the node left: nothing lost"
    assert_all_ok(checks, logs)
    start_b = events(tail_b.records, "start")[0]
    assert start_b["restored_step"] >= noticed_at and start_b["world_size"] == 1
