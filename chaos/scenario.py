"""Chaos scenarios: a YAML file, validated against `contracts/scenario.schema.json`, as data.

A scenario says how many nodes start, how far the cluster may shrink and grow, where checkpoints
live, which trainer overrides to use and which faults to inject. `load()` raises `ScenarioError`
with one line naming the first problem; nothing is started before a scenario has validated.

The schemas under `chaos/contracts/` say what any harness must accept (more keys and fault kinds
are welcome there); this harness validates against them and then refuses, with one line each,
what it cannot run: a fault kind it does not know, a key of a fault it would ignore.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from typing import Any, Literal, get_args

import jsonschema
import yaml

CONTRACTS = Path(__file__).parent / "contracts"

FaultKind = Literal[
    "kill_node", "preempt_node", "add_node", "kill_worker", "hang_worker", "storage_outage"
]
Storage = Literal["s3", "gcs", "file"]

REMOVES_NODE: frozenset[str] = frozenset({"kill_node", "preempt_node"})
"""Fault kinds after which the targeted node is gone for good."""
TARGETS_NODE: frozenset[str] = frozenset(
    {"kill_node", "preempt_node", "kill_worker", "hang_worker"})
"""Fault kinds that act on one node (when `node` is absent: the newest live node)."""

DEFAULT_NOTICE_S = 5.0
"""preempt_node without `notice_s`: seconds between the notice and the kill."""
DEFAULT_OUTAGE_S = 5.0
"""storage_outage without `seconds`: how long every storage call fails."""
DEFAULT_STEPS = 200
"""The trainer's default `steps`, used when the scenario does not set train.steps."""


class ScenarioError(ValueError):
    """A scenario the harness refuses to run; the message is one line for the user."""


@cache
def schema(name: str) -> dict[str, Any]:
    """The JSON schema `contracts/{name}.schema.json` (name: "scenario" or "report")."""
    return json.loads((CONTRACTS / f"{name}.schema.json").read_text())


@dataclass(frozen=True)
class Fault:
    """One fault to inject. Fires when the run first reports `at_step`, or, with
    `during="checkpoint_upload"`, at the first checkpoint upload seen in flight after every fault
    listed before it has fired."""

    kind: FaultKind
    at_step: int | None = None
    during: Literal["checkpoint_upload"] | None = None
    node: int | None = None
    notice_s: float | None = None
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The YAML form: only the keys that are set."""
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def describe(self) -> str:
        when = f"step {self.at_step}" if self.at_step is not None else f"during {self.during}"
        where = f" node {self.node}" if self.node is not None else ""
        return f"{self.kind}{where} at {when}"


@dataclass(frozen=True)
class Scenario:
    name: str
    nodes: int
    train: dict[str, Any]
    seed: int = 0
    min_nodes: int = 1
    max_nodes: int = 0
    """0 in the constructor means `nodes`; `load()` always fills it in."""
    procs_per_node: int = 1
    storage: Storage = "file"
    faults: tuple[Fault, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.max_nodes:
            object.__setattr__(self, "max_nodes", max(self.nodes, self.min_nodes))

    @property
    def steps(self) -> int:
        return int(self.train.get("steps", DEFAULT_STEPS))

    @property
    def checkpoint_every(self) -> int:
        return int(self.train.get("checkpoint.every", 50))

    def with_faults(self, faults: list[Fault] | tuple[Fault, ...]) -> Scenario:
        return replace(self, faults=tuple(faults))

    def to_dict(self) -> dict[str, Any]:
        """The scenario as YAML would hold it (validates against the schema)."""
        return {
            "name": self.name,
            "seed": self.seed,
            "nodes": self.nodes,
            "min_nodes": self.min_nodes,
            "max_nodes": self.max_nodes,
            "procs_per_node": self.procs_per_node,
            "storage": self.storage,
            "train": dict(self.train),
            "faults": [f.to_dict() for f in self.faults],
        }


def _where(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    return path or "top level"


def from_dict(data: Any, source: str = "scenario") -> Scenario:
    """Validate `data` (a parsed YAML document) and build the Scenario.

    Raises ScenarioError naming `source`, the offending key and what was expected."""
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: expected a mapping at the top level")
    validator = jsonschema.Draft202012Validator(schema("scenario"))
    errors = sorted(validator.iter_errors(data), key=lambda e: (len(e.absolute_path), e.path))
    if errors:
        e = errors[0]
        if e.validator == "oneOf":
            msg = "a fault needs exactly one of at_step or during"
        else:
            msg = e.message
        raise ScenarioError(f"{source}: {_where(e)}: {msg}")
    _refuse_unknown_keys(data, list(schema("scenario")["properties"]), source)
    faults = tuple(_fault(f, f"{source}: faults.{i}")
                   for i, f in enumerate(data.get("faults") or []))
    nodes = data["nodes"]
    scenario = Scenario(
        name=data["name"],
        nodes=nodes,
        train=dict(data["train"]),
        seed=data.get("seed", 0),
        min_nodes=data.get("min_nodes", 1),
        max_nodes=data.get("max_nodes", max(nodes, data.get("min_nodes", 1))),
        procs_per_node=data.get("procs_per_node", 1),
        storage=data.get("storage", "file"),
        faults=faults,
    )
    check(scenario, source)
    return scenario


FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)


def _refuse_unknown_keys(data: dict[str, Any], known: list[str], where: str) -> None:
    """A key this harness would ignore is most often a typo: refuse it, naming the closest."""
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ScenarioError(f"{where}: unknown key {key!r}{hint}; expected some of "
                                f"{', '.join(known)}")


def _fault(data: dict[str, Any], where: str) -> Fault:
    """One fault of a schema-valid document; raises ScenarioError for what this harness cannot run
    (the contract lets other harnesses define more kinds and keys)."""
    if data["kind"] not in FAULT_KINDS:
        raise ScenarioError(f"{where}: fault kind {data['kind']!r} is not one this harness runs; "
                            f"expected one of {', '.join(FAULT_KINDS)}")
    _refuse_unknown_keys(data, [f.name for f in fields(Fault)], where)
    if isinstance(data.get("node"), list):
        raise ScenarioError(f"{where}: node {data['node']}: this harness takes one node per "
                            "fault; list one fault per node")
    return Fault(**data)


def load(path: str | Path) -> Scenario:
    """Read and validate a scenario YAML file; raises ScenarioError (one line) when it is bad."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ScenarioError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ScenarioError(f"{path}: not valid YAML{where}") from None
    return from_dict(data, str(path))


def check(s: Scenario, source: str = "scenario") -> None:
    """The rules a schema cannot say: node counts in order, faults that can happen.

    Faults are simulated in firing order (at_step faults by step, `during` faults where listed) to
    check that every targeted node exists and is alive and that the cluster never drops below one
    node or grows beyond max_nodes."""

    def fail(msg: str) -> None:
        raise ScenarioError(f"{source}: {msg}")

    if not s.min_nodes <= s.nodes <= s.max_nodes:
        fail(f"need min_nodes <= nodes <= max_nodes, got {s.min_nodes} <= {s.nodes} <= "
             f"{s.max_nodes}")
    if s.steps < 1:
        fail("train.steps must be >= 1")
    alive = set(range(s.nodes))
    created = s.nodes
    for i, f in firing_order(s.faults):
        label = f"faults.{i} ({f.kind})"
        if f.at_step is not None and f.at_step >= s.steps:
            fail(f"{label}: at_step {f.at_step} is not before the last step {s.steps}")
        if f.kind == "storage_outage" and s.storage == "file":
            fail(f"{label}: storage_outage needs storage s3 or gcs (a file system has no proxy)")
        if f.kind == "add_node":
            if f.node is not None:
                fail(f"{label}: add_node takes no node (new nodes are numbered {created}, ...)")
            if len(alive) >= s.max_nodes:
                fail(f"{label}: the cluster already has max_nodes={s.max_nodes} nodes")
            alive.add(created)
            created += 1
            continue
        if f.kind in TARGETS_NODE and f.node is not None and f.node not in alive:
            state = "was already removed" if f.node < created else "does not exist yet"
            fail(f"{label}: node {f.node} {state}")
        if f.kind in REMOVES_NODE:
            if len(alive) <= 1:
                fail(f"{label}: removing a node would leave none to train")
            alive.discard(f.node if f.node is not None else max(alive))


def firing_order(faults: tuple[Fault, ...] | list[Fault]) -> list[tuple[int, Fault]]:
    """(index, fault) in the order they are expected to fire: at_step faults by step (ties in list
    order); a `during` fault right after the fault listed before it."""
    keyed: list[tuple[float, int, Fault]] = []
    last = -1.0
    for i, f in enumerate(faults):
        key = float(f.at_step) if f.at_step is not None else last + 0.5
        last = key
        keyed.append((key, i, f))
    return [(i, f) for _, i, f in sorted(keyed, key=lambda k: (k[0], k[1]))]
