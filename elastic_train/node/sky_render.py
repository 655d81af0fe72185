"""`elastic-train sky render|check`: SkyPilot task YAMLs without editing YAML, checked.

    elastic-train sky render --nodes 4 --accelerators A100:8 --bucket s3://my-bucket/et > my.yaml
    sky jobs launch my.yaml

`render` prints `sky/train.yaml` with the given values filled in; the output parses with
`sky.Task.from_yaml` without further `--env` flags. `check` runs SkyPilot's own parser and schema
on task YAMLs plus what parsing misses (job_recovery keys and strategy). What every node of the
cluster runs is `python -m elastic_train.node.launch`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from elastic_train import exit_codes

TEMPLATE = Path(__file__).resolve().parents[2] / "sky" / "train.yaml"
"""The managed-job YAML `render` starts from (the source tree; `workdir: .` needs it anyway)."""

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


def render(args: argparse.Namespace, template: Path = TEMPLATE) -> dict[str, Any]:
    """The task config for `args`; raises RenderError naming the first bad argument."""
    if args.nodes < 1:
        raise RenderError(f"--nodes={args.nodes} must be >= 1")
    min_nodes = args.min_nodes if args.min_nodes is not None else 1
    if not 1 <= min_nodes <= args.nodes:
        raise RenderError(f"--min-nodes={min_nodes} must be between 1 and --nodes={args.nodes}")
    if not args.bucket:
        raise RenderError("give --bucket: s3://bucket/prefix or gs://bucket/prefix")
    if not args.bucket.startswith(BUCKET_SCHEMES):
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
    envs["BUCKET"] = args.bucket.rstrip("/")
    envs["RUN_NAME"] = args.run_name or ""
    envs["MIN_NODES"] = str(min_nodes)
    for key, value in (("DATA_URI", args.data_uri), ("CONFIG", args.config),
                       ("TRAIN_ARGS", args.train_args)):
        if value is not None:
            envs[key] = value
    return task


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (setup, run, hooks) as `|` blocks, as a person would write them."""


_Dumper.add_representer(str, lambda dumper, s: dumper.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def to_yaml(task: dict[str, Any]) -> str:
    header = ("# Rendered by `elastic-train sky render` from sky/train.yaml "
              "(its comments explain each field).\n")
    return header + yaml.dump(task, Dumper=_Dumper, sort_keys=False, width=100)


PLACEHOLDER = "s3://placeholder/required"
"""Stands in for a required (null) env while checking; SkyPilot refuses the YAML without one."""


def check(path: str | Path) -> dict[str, Any]:
    """Check one task YAML with SkyPilot's own code. Needs `skypilot` (the `sky` extra); importing
    it creates `~/.sky`, so point HOME elsewhere when that matters.

    Returns {"path", "errors": [...], "required_envs", "envs", "run", "num_nodes", "resources":
    [{"infra", "use_spot", "accelerators", "job_recovery"}], "hooks"}; no errors means SkyPilot
    0.14.1 accepts the file for `sky launch` / `sky jobs launch` given the required envs.
    """
    from sky.jobs import recovery_strategy  # noqa: F401  (registers the strategies)
    from sky.utils import registry, schemas

    import sky

    path = Path(path)
    result: dict[str, Any] = {"path": str(path), "errors": []}
    errors: list[str] = result["errors"]
    text = path.read_text()
    raw = yaml.safe_load(text) or {}
    envs = raw.get("envs") or {}
    required = sorted(k for k, v in envs.items() if v is None)
    result["required_envs"] = required
    try:
        if required:
            try:
                sky.Task.from_yaml_str(text)
                errors.append(f"required envs {required} were not enforced by SkyPilot")
            except ValueError as e:
                if not re.search(r"Environment variable '(\w+)' is None", str(e)):
                    raise
            task = sky.Task.from_yaml_config(
                yaml.safe_load(text), env_overrides=[(k, PLACEHOLDER) for k in required])
        else:
            task = sky.Task.from_yaml(str(path))
    except Exception as e:  # SkyPilot raises ValueError and jsonschema errors
        errors.append(f"SkyPilot rejects it: {e}")
        return result

    result.update(envs=dict(task.envs), run=task.run, num_nodes=task.num_nodes)
    recovery_schema = schemas.get_resources_schema()["properties"]["job_recovery"]["anyOf"][1]
    known_keys = set(recovery_schema["properties"])
    strategies = set(registry.JOBS_RECOVERY_STRATEGY_REGISTRY.keys())
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
        strategy = recovery.get("strategy")
        if strategy is not None and str(strategy).lower() not in strategies:
            errors.append(f"job_recovery strategy {strategy!r} is not one of "
                          f"{sorted(s.upper() for s in strategies)}")
    result["resources"] = resources
    result["hooks"] = list(task.resources)[0].hooks if task.resources else None
    return result


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
    return main_check(args.files, args.json)


def _render_cmd(args: argparse.Namespace) -> int:
    try:
        task = render(args)
    except RenderError as e:
        print(f"elastic-train sky render: error: {e}", file=sys.stderr)
        return exit_codes.BAD_CONFIG
    sys.stdout.write(to_yaml(task))
    return exit_codes.OK


def register(subparsers: argparse._SubParsersAction) -> None:
    sky = subparsers.add_parser("sky", help="SkyPilot: render or check task YAMLs")
    commands = sky.add_subparsers(dest="sky_command", required=True, metavar="SUBCOMMAND")

    r = commands.add_parser(
        "render", help="print a managed spot job YAML (sky/train.yaml filled in) to stdout",
        description="Print sky/train.yaml with these values; launch it with `sky jobs launch`.")
    r.add_argument("--nodes", type=int, required=True, help="nodes in the cluster (num_nodes)")
    r.add_argument("--accelerators", required=True,
                   help="per node, e.g. A100:8; several (any one of them): A100:8,H100:8")
    r.add_argument("--bucket", help="s3://bucket/prefix or gs://...; the run "
                   "lives at BUCKET/runs/RUN_NAME")
    r.add_argument("--run-name", help="default: the job's SKYPILOT_TASK_ID; an existing run's "
                   "name resumes it (any cloud or region)")
    r.add_argument("--min-nodes", type=int, help="keep training while this many nodes are up "
                   "(default 1)")
    r.add_argument("--infra", action="append",
                   help="cloud[/region[/zone]], repeatable; default: any of aws, gcp, azure")
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
    c.add_argument("files", nargs="+", help="task YAML files")
    c.add_argument("--json", action="store_true", help="print the results as JSON")
    c.set_defaults(func=_check_cmd)

