"""`elastic-train sky render|check`: SkyPilot YAMLs without editing YAML, checked.

    elastic-train sky render --mode group --nodes 4 --accelerators A100:8 \
        --infra aws/us-east-1 --bucket s3://my-bucket/et > my.yaml
    sky jobs launch my.yaml

Two launch modes:
- `group` (VMs): a SkyPilot job group (`sky/train-group.yaml` for N = 2): a `coord` task (one
  small on-demand CPU node hosting the rendezvous store, `elastic_train.node.coordinator`) and N
  single-node spot tasks `w0..w{N-1}`, each recovered by SkyPilot on its own, all in one region.
  A lost worker is re-provisioned alone while the others train on in a smaller world.
- `cluster`: `sky/train.yaml` with the values filled in, one N-node managed job, recovered as a
  whole (Kubernetes, or one cluster wanted).

Either output parses with SkyPilot's own parser without further `--env` flags. `check` runs
SkyPilot's parser and schema on task and job-group YAMLs plus what parsing misses (job_recovery
keys and strategy), and, with `--config`, SkyPilot's config schema on the user's SkyPilot config
plus what each cloud needs for the group's private cross-cluster traffic.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from elastic_train import exit_codes
from elastic_train.node.launch import DEFAULT_RDZV_PORT, GROUP_NODES_ENV

TEMPLATE = Path(__file__).resolve().parents[2] / "sky" / "train.yaml"
"""The managed-job YAML `render` starts from (the source tree; `workdir: .` needs it anyway)."""

MODES = ("group", "cluster")
COORD_TASK = "coord"
"""The job group's coordinator task; the workers are `w0..w{N-1}` (`worker_task`)."""
COORD_RUN = "exec python -m elastic_train.node.coordinator\n"
COORD_CPUS = "2+"
GROUP_RECOVERY = "FAILOVER"
"""Per worker task: retry in the same region. EAGER_NEXT_REGION would also tear down a healthy VM
on a user-code restart, and every task of a group must stay in one region anyway."""
GROUP_TERMINATION_DELAY = "0s"
"""How long the coordinator outlives the last worker task: nothing needs it then."""

BUCKET_SCHEMES = ("s3://", "gs://")


class RenderError(ValueError):
    """Arguments that cannot make a launchable YAML; the message is one line for the user."""


def parse_accelerators(spec: str) -> str | dict[str, int | None]:
    """`A100:8` -> "A100:8"; `A100:8,H100:8` -> {"A100": 8, "H100": 8} (any one of them)."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise RenderError("--accelerators is empty; expected NAME:COUNT[,NAME:COUNT...]")
    parsed: dict[str, int | None] = {}
    for item in items:
        name, _, count = item.partition(":")
        if not name or (count and not count.isdigit()) or count == "0":
            raise RenderError(f"--accelerators item {item!r} is not NAME or NAME:COUNT, COUNT >= 1")
        parsed[name] = int(count) if count else None
    if len(parsed) == 1:
        return items[0]
    return parsed


def worker_task(index: int) -> str:
    return f"w{index}"


def render(args: argparse.Namespace, template: Path = TEMPLATE,
           require_bucket: bool = True) -> dict[str, Any]:
    """The whole-cluster task config for `args`; raises RenderError naming the first bad argument.
    Without a bucket (only when not `require_bucket`) BUCKET stays required at launch."""
    if args.nodes < 1:
        raise RenderError(f"--nodes={args.nodes} must be >= 1")
    min_nodes = args.min_nodes if args.min_nodes is not None else 1
    if not 1 <= min_nodes <= args.nodes:
        raise RenderError(f"--min-nodes={min_nodes} must be between 1 and --nodes={args.nodes}")
    if not args.bucket and require_bucket:
        raise RenderError("give --bucket: s3://bucket/prefix or gs://bucket/prefix")
    if args.bucket and not args.bucket.startswith(BUCKET_SCHEMES):
        raise RenderError(f"--bucket={args.bucket!r} must start with "
                          f"{' or '.join(BUCKET_SCHEMES)}: checkpoints must outlive the cluster")
    if not template.is_file():
        raise RenderError(f"{template} not found: run render from a checkout of elastic-train")

    task: dict[str, Any] = yaml.safe_load(template.read_text())
    task["num_nodes"] = args.nodes
    if args.name:
        task["name"] = args.name
    resources = task["resources"]
    resources["accelerators"] = parse_accelerators(args.accelerators)
    resources["use_spot"] = not args.on_demand
    if args.infra:
        resources.pop("any_of", None)
        if len(args.infra) == 1:
            resources["infra"] = args.infra[0]
        else:
            resources["any_of"] = [{"infra": infra} for infra in args.infra]
    if args.max_restarts_on_errors is not None:
        resources["job_recovery"]["max_restarts_on_errors"] = args.max_restarts_on_errors
    envs = task["envs"]
    envs["BUCKET"] = args.bucket.rstrip("/") if args.bucket else None
    envs["RUN_NAME"] = args.run_name or ""
    envs["MIN_NODES"] = str(min_nodes)
    for key, value in (("DATA_URI", args.data_uri), ("CONFIG", args.config),
                       ("TRAIN_ARGS", args.train_args)):
        if value is not None:
            envs[key] = value
    return task


def render_group(args: argparse.Namespace, template: Path = TEMPLATE,
                 require_bucket: bool = True) -> list[dict[str, Any]]:
    """The job group for `args`: [header, coord, w0, ..., w{N-1}]. Raises RenderError naming the
    first bad argument (as `render`, and: exactly one --infra, cloud/region)."""
    infra = args.infra or []
    if len(infra) != 1 or len([p for p in infra[0].split("/") if p]) < 2:
        raise RenderError(f"--infra={','.join(infra) or '(none)'}: group mode pins every task to "
                          "one region; give it once as cloud/region, e.g. aws/us-east-1")
    if infra[0].split("/")[0].lower() in ("kubernetes", "k8s"):
        raise RenderError(f"--infra={infra[0]}: on Kubernetes use --mode cluster (pods are "
                          "replaced one by one there already)")
    worker = render(args, template, require_bucket)
    worker.pop("num_nodes", None)
    resources = worker["resources"]
    resources["job_recovery"]["strategy"] = GROUP_RECOVERY
    envs = worker["envs"]
    envs[GROUP_NODES_ENV] = str(args.nodes)
    name = worker["name"]
    shared_envs = {"BUCKET": envs["BUCKET"], "RUN_NAME": envs["RUN_NAME"]}
    coord: dict[str, Any] = {
        "name": COORD_TASK,
        "resources": {
            "infra": resources["infra"], "cpus": COORD_CPUS, "use_spot": False,
            # Holds no training state: any failure is worth a restart, on a new node if need be.
            "job_recovery": {"strategy": GROUP_RECOVERY,
                             "max_restarts_on_errors": resources["job_recovery"].get(
                                 "max_restarts_on_errors", 3)},
        },
        "envs": {**shared_envs, "RDZV_PORT": str(DEFAULT_RDZV_PORT)},
        "workdir": worker["workdir"], "setup": worker["setup"], "run": COORD_RUN,
    }
    workers = [{"name": worker_task(i), **{k: v for k, v in worker.items() if k != "name"}}
               for i in range(args.nodes)]
    header = {"name": name, "execution": "parallel",
              "primary_tasks": [w["name"] for w in workers],
              "termination_delay": GROUP_TERMINATION_DELAY, "inter_connection": False}
    return [header, coord, *workers]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (setup, run, hooks) as `|` blocks, as a person would write them."""


_Dumper.add_representer(str, lambda dumper, s: dumper.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def to_yaml(task: dict[str, Any]) -> str:
    header = ("# Rendered by `elastic-train sky render` from sky/train.yaml "
              "(its comments explain each field).\n")
    return header + _dump(task)


def _dump(doc: dict[str, Any]) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100)


GROUP_HEADER_COMMENT = """\
# A SkyPilot job group (`elastic-train sky render --mode group`; sky/train.yaml's comments explain
# the worker tasks' fields). Launch: sky jobs launch THIS.yaml --env BUCKET=s3://my-bucket/et
# `coord` hosts the rendezvous store and writes its private address under the run's URI; each
# worker task w0..w{N-1} is one spot node that SkyPilot recovers on its own (FAILOVER), while the
# others train on in a smaller world. The number of worker tasks is fixed here.
# Separate clusters must reach each other on private addresses, all TCP ports: run
# `elastic-train sky check --config ~/.sky/config.yaml` (never `resources.ports`).
"""


def to_group_yaml(docs: list[dict[str, Any]]) -> str:
    """The job group as SkyPilot's multi-document YAML."""
    return GROUP_HEADER_COMMENT + "---\n".join(_dump(doc) for doc in docs)


PLACEHOLDER = "s3://placeholder/required"
"""Stands in for a required (null) env while checking; SkyPilot refuses the YAML without one."""


def check(path: str | Path) -> dict[str, Any]:
    """Check one task or job-group YAML with SkyPilot's own code. Needs `skypilot` (the `sky`
    extra); importing it creates `~/.sky`, so point HOME elsewhere when that matters.

    Returns {"path", "errors": [...], "required_envs", "envs", "run", "num_nodes", "resources":
    [{"infra", "use_spot", "accelerators", "job_recovery"}], "hooks"}; for a job group, also
    "group": {"name", "execution", "primary_tasks", "termination_delay", "inter_connection"} and
    "tasks": {name: the same keys for that task}, the top-level keys then being the first
    primary task's. No errors means SkyPilot 0.14.1 accepts the file for `sky launch` /
    `sky jobs launch` given the required envs.
    """
    from sky.utils import dag_utils

    path = Path(path)
    result: dict[str, Any] = {"path": str(path), "errors": []}
    text = path.read_text()
    try:
        is_group = dag_utils.is_job_group_yaml_str(text)
    except Exception as e:  # noqa: BLE001 - a YAML SkyPilot cannot even read
        result["errors"].append(f"SkyPilot rejects it: {e}")
        return result
    if not is_group:
        result.update(_check_task(text))
        return result
    return {**result, **_check_group(text)}


def _required_envs(raw: dict[str, Any]) -> list[str]:
    return sorted(k for k, v in (raw.get("envs") or {}).items() if v is None)


def _check_group(text: str) -> dict[str, Any]:
    """`check` of a job-group YAML: SkyPilot's `load_dag_from_yaml_str`, then each task's own
    checks (`_check_task`); the strategy and keys of job_recovery as for a task."""
    from sky.utils import dag_utils

    docs = [d for d in yaml.safe_load_all(text)]
    errors: list[str] = []
    required = sorted({k for d in docs[1:] if d for k in _required_envs(d)})
    overrides = [(k, PLACEHOLDER) for k in required]
    result: dict[str, Any] = {"errors": errors, "required_envs": required}
    logger = logging.getLogger(dag_utils.__name__)
    level = logger.level
    # It logs "Loaded Job Group ..." to stdout (where --json goes) and warns of unknown header
    # keys, which we report as an error below.
    logger.setLevel(logging.ERROR)
    try:
        dag = dag_utils.load_dag_from_yaml_str(text, env_overrides=overrides)
    except Exception as e:  # noqa: BLE001 - SkyPilot raises ValueError and jsonschema errors
        errors.append(f"SkyPilot rejects it: {e}")
        return result
    finally:
        logger.setLevel(level)
    header = docs[0] or {}
    # SkyPilot's own list of header keys (private in 0.14.1; tests/test_sky_group.py fails if it
    # moves): it only logs a warning for another key.
    unknown = sorted(set(header) - set(dag_utils._JOB_GROUP_HEADER_FIELDS))
    if unknown:  # SkyPilot only logs a warning and ignores them
        errors.append(f"job group header keys {unknown} are not SkyPilot's "
                      f"({sorted(dag_utils._JOB_GROUP_HEADER_FIELDS)})")
    primary = list(dag.primary_tasks or [t.name for t in dag.tasks])
    result["group"] = {"name": dag.name, "execution": dag.execution.value,
                       "primary_tasks": primary, "termination_delay": dag.termination_delay,
                       "inter_connection": header.get("inter_connection")}
    tasks: dict[str, Any] = {}
    for doc in docs[1:]:
        if not doc:
            continue
        task = _check_task(yaml.safe_dump(doc), overrides)
        errors.extend(f"task {doc['name']}: {e}" for e in task.pop("errors"))
        if (doc.get("resources") or {}).get("ports"):
            errors.append(f"task {doc['name']}: resources.ports opens the unauthenticated "
                          "rendezvous store to the internet; the clusters talk on private "
                          "addresses (see `elastic-train sky check --config`)")
        tasks[doc["name"]] = task
    result["tasks"] = tasks
    infras = {r["infra"] for t in tasks.values() for r in t.get("resources", [])}
    if len(infras) != 1 or any(len(i.split("/")) < 2 for i in infras):
        errors.append(f"tasks run on {sorted(infras)}: pin every task to one cloud/region")
    if primary:
        result.update({k: v for k, v in tasks[primary[0]].items() if k != "required_envs"})
    return result


def _check_task(text: str, env_overrides: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """SkyPilot's `Task` parser on one task document, then the job_recovery keys and strategy,
    which it lets through. With `env_overrides`, required envs are taken as given."""
    from sky.jobs import recovery_strategy  # noqa: F401  (registers the strategies)
    from sky.utils import schemas

    import sky

    result: dict[str, Any] = {"errors": []}
    errors: list[str] = result["errors"]
    raw = yaml.safe_load(text) or {}
    required = _required_envs(raw)
    result["required_envs"] = required
    try:
        if required and env_overrides is None:
            try:
                sky.Task.from_yaml_str(text)
                errors.append(f"required envs {required} were not enforced by SkyPilot")
            except ValueError as e:
                if not re.search(r"Environment variable '(\w+)' is None", str(e)):
                    raise
            env_overrides = [(k, PLACEHOLDER) for k in required]
        task = sky.Task.from_yaml_config(yaml.safe_load(text), env_overrides=env_overrides)
    except Exception as e:  # SkyPilot raises ValueError and jsonschema errors
        errors.append(f"SkyPilot rejects it: {e}")
        return result

    result.update(envs=dict(task.envs), run=task.run, num_nodes=task.num_nodes)
    recovery_schema = schemas.get_resources_schema()["properties"]["job_recovery"]["anyOf"][1]
    known_keys = set(recovery_schema["properties"])
    resources = []
    for r in task.resources:
        recovery = r.job_recovery
        resources.append({"infra": r.infra.to_str(), "use_spot": r.use_spot,
                          "accelerators": r.accelerators, "job_recovery": recovery})
        if recovery is None:
            continue
        unknown = set(recovery) - known_keys
        if unknown:
            errors.append(f"job_recovery keys {sorted(unknown)} are not SkyPilot's "
                          f"({sorted(known_keys)}); SkyPilot would ignore them")
        error = strategy_error(recovery.get("strategy"))
        if error:
            errors.append(error)
    result["resources"] = resources
    result["hooks"] = list(task.resources)[0].hooks if task.resources else None
    return result


def recovery_strategies() -> list[str]:
    """SkyPilot's registered job recovery strategies, upper case (as YAMLs spell them)."""
    from sky.jobs import recovery_strategy  # noqa: F401  (registers the strategies)
    from sky.utils import registry

    return sorted(s.upper() for s in registry.JOBS_RECOVERY_STRATEGY_REGISTRY.keys())


def strategy_error(strategy: object) -> str | None:
    """None if `strategy` is None or one of SkyPilot's strategies; else a line saying so."""
    if strategy is None or str(strategy).upper() in recovery_strategies():
        return None
    return f"job_recovery strategy {strategy!r} is not one of {recovery_strategies()}"


NETWORK_CLOUDS = ("aws", "gcp", "azure", "kubernetes")
SAMPLE_CLUSTERS = (f"{COORD_TASK}-1", f"{worker_task(0)}-1")
"""Cluster names SkyPilot gives a group's tasks (`<task>-<job id>`): a per-cluster setting must
resolve to the same value for both."""


def check_config(path: str | Path) -> tuple[list[str], dict[str, str]]:
    """Check a SkyPilot config file (`~/.sky/config.yaml`) with SkyPilot's own config schema,
    then say, per cloud, whether a job group's clusters reach each other on private addresses
    on every TCP port (gloo and NCCL use ephemeral ones). Returns (errors, {cloud: one line});
    an unreadable or schema-invalid file gives errors and no lines."""
    from sky.utils import common_utils, schemas

    path = Path(path).expanduser()
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        return [f"cannot read {path}: {e}"], {}
    if not isinstance(cfg, dict):
        return [f"{path}: expected a mapping at the top level"], {}
    try:
        common_utils.validate_schema(cfg, schemas.get_config_schema(),
                                     f"Invalid config YAML ({path}): ")
    except ValueError as e:
        return [str(e).strip().splitlines()[0]], {}
    return [], {cloud: _network_line(cloud, cfg.get(cloud) or {}) for cloud in NETWORK_CLOUDS}


def _per_cluster(value: Any, cluster: str) -> str | None:
    """A `NAME` or `[{cluster-pattern: NAME}, ...]` setting as SkyPilot resolves it for `cluster`
    (first matching pattern)."""
    import fnmatch

    if isinstance(value, str) or value is None:
        return value
    for item in value:
        for pattern, name in item.items():
            if fnmatch.fnmatchcase(cluster, pattern):
                return name
    return None


def _network_line(cloud: str, section: dict[str, Any]) -> str:
    """One line: what `cloud` needs for private traffic between the group's clusters."""
    if cloud == "aws":
        groups = {_per_cluster(section.get("security_group_name"), c) for c in SAMPLE_CLUSTERS}
        if len(groups) == 1 and None not in groups:
            return (f"ok: every cluster joins security group {groups.pop()!r} (it must allow "
                    "all TCP from itself)")
        return ("missing: set one shared aws.security_group_name (a string, or a '*' entry); "
                "each cluster otherwise gets its own group and the workers cannot reach the "
                "coordinator")
    if cloud == "azure":
        if section.get("vpc_name"):
            return f"ok: every cluster in VNet {section['vpc_name']!r}"
        return ("missing: set a shared azure.vpc_name; each cluster otherwise gets its own "
                "VNet")
    if cloud == "gcp":
        if section.get("vpc_name"):
            return (f"check: VPC {section['vpc_name']!r} must allow all TCP between its private "
                    "addresses (the default VPC does)")
        return "ok: the default VPC allows all TCP between private addresses"
    return ("ok: pods reach each other unless a NetworkPolicy in the namespace forbids it "
            "(group mode is for VMs; use sky/train.yaml)")


def main_check(files: list[str], as_json: bool = True) -> int:
    """Check `files`, print the results (JSON, or a line per file); 0 when all pass, else 1."""
    results = [check(p) for p in files]
    if as_json:
        print(json.dumps(results, default=str))
    else:
        for r in results:
            status = "ok" if not r["errors"] else "FAILED"
            needs = f" (needs --env {', --env '.join(r['required_envs'])})" if r.get(
                "required_envs") else ""
            print(f"{r['path']}: {status}{needs}")
            for error in r["errors"]:
                print(f"  {error}")
    return exit_codes.OK if all(not r["errors"] for r in results) else 1


def _check_cmd(args: argparse.Namespace) -> int:
    if not args.files and not args.config:
        print("elastic-train sky check: error: give YAML files, --config PATH, or both",
              file=sys.stderr)
        return exit_codes.BAD_CONFIG
    code = main_check(args.files, args.json) if args.files else exit_codes.OK
    if args.config:
        errors, lines = check_config(args.config)
        for error in errors:
            print(f"{args.config}: FAILED: {error}")
        for cloud, line in lines.items():
            print(f"{args.config}: {cloud}: {line}")
        if errors:
            code = 1
    return code


def default_mode(args: argparse.Namespace) -> str:
    """--mode as given; without it, a job group for VMs (exactly one --infra naming a cloud
    region other than Kubernetes), one cluster otherwise (Kubernetes, several candidates, or no
    --infra: SkyPilot chooses, which a group cannot let it do)."""
    if args.mode:
        return args.mode
    infra = args.infra or []
    if len(infra) == 1 and len([p for p in infra[0].split("/") if p]) >= 2 and \
            infra[0].split("/")[0].lower() not in ("kubernetes", "k8s"):
        return "group"
    return "cluster"


def _render_cmd(args: argparse.Namespace) -> int:
    try:
        text = (to_group_yaml(render_group(args)) if default_mode(args) == "group"
                else to_yaml(render(args)))
    except RenderError as e:
        print(f"elastic-train sky render: error: {e}", file=sys.stderr)
        return exit_codes.BAD_CONFIG
    sys.stdout.write(text)
    return exit_codes.OK


def register(subparsers: argparse._SubParsersAction) -> None:
    sky = subparsers.add_parser("sky", help="SkyPilot: render or check YAMLs and its config")
    commands = sky.add_subparsers(dest="sky_command", required=True, metavar="SUBCOMMAND")

    r = commands.add_parser(
        "render", help="print a managed spot job YAML (a job group, or sky/train.yaml filled in)",
        description="Print a job group (--mode group: a coordinator and one spot task per node, "
        "each recovered alone) or sky/train.yaml (--mode cluster: one cluster, recovered whole) "
        "with these values; launch it with `sky jobs launch`.")
    r.add_argument("--mode", choices=MODES, default=None,
                   help="group: a job group, for VMs (needs one --infra cloud/region); "
                   "cluster: one N-node job, for Kubernetes or one cluster. Default: group "
                   "with one --infra cloud/region on VMs, else cluster")
    r.add_argument("--nodes", type=int, required=True,
                   help="nodes (group: worker tasks, fixed in the YAML; cluster: num_nodes)")
    r.add_argument("--accelerators", required=True,
                   help="per node, e.g. A100:8; several (any one of them): A100:8,H100:8")
    r.add_argument("--bucket", help="s3://bucket/prefix or gs://...; the run "
                   "lives at BUCKET/runs/RUN_NAME")
    r.add_argument("--run-name", help="default: the job's own id (cluster: SKYPILOT_TASK_ID; "
                   "group: NAME-SKYPILOT_MANAGED_JOB_ID); an existing run's name resumes it")
    r.add_argument("--min-nodes", type=int, help="keep training while this many nodes are up "
                   "(default 1)")
    r.add_argument("--infra", action="append",
                   help="cloud[/region[/zone]], repeatable; default: any of aws, gcp, azure; "
                   "group mode: exactly one cloud/region")
    r.add_argument("--data-uri", help="prepared dataset (elastic-train data prepare --out)")
    r.add_argument("--config", help="trainer TOML file inside the workdir")
    r.add_argument("--train-args", help='trainer overrides, e.g. "--steps=20000"')
    r.add_argument("--on-demand", action="store_true", help="on-demand instead of spot")
    r.add_argument("--max-restarts-on-errors", type=int,
                   help="SkyPilot restarts after other errors (default from sky/train.yaml)")
    r.add_argument("--name", help="job name")
    r.set_defaults(func=_render_cmd)

    c = commands.add_parser(
        "check", help="check task YAMLs with SkyPilot's own parser and schema",
        description="SkyPilot's parser and schema, plus job_recovery keys and strategy.")
    c.add_argument("files", nargs="*", help="task or job-group YAML files")
    c.add_argument("--config", help="a SkyPilot config file (e.g. ~/.sky/config.yaml): its "
                   "schema, and per cloud what a job group's private traffic needs")
    c.add_argument("--json", action="store_true", help="print the results as JSON")
    c.set_defaults(func=_check_cmd)

