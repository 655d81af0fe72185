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
    "kill_node", "preempt_node", "vanish_node", "add_node", "kill_worker", "hang_worker",
    "storage_outage",
]
During = Literal["checkpoint_upload", "reform"]
Phase = Literal["rendezvous", "workers", "restore"]
"""The phases of a re-form a `during: reform` fault can aim at, in the order they come:
rendezvous (a live node's agent has entered the rendezvous: torchrun logged "Rendezvous'ing
worker group"), workers (ranks are assigned and it starts its workers: "Starting worker group"),
restore (those workers run but the new world has not reported `start`: process group, model
build, checkpoint load)."""
PHASES: tuple[str, ...] = get_args(Phase)
Storage = Literal["s3", "gcs", "file"]

REMOVES_NODE: frozenset[str] = frozenset({"kill_node", "preempt_node", "vanish_node"})
"""Fault kinds after which the targeted node is gone for good (a vanished node's frozen processes
are reaped only when the run ends, but it takes no further part)."""
TARGETS_NODE: frozenset[str] = frozenset(
    {"kill_node", "preempt_node", "vanish_node", "kill_worker", "hang_worker"})
"""Fault kinds that act on one node (when `node` is absent: the newest live node)."""
WAVE_KINDS: frozenset[str] = REMOVES_NODE
"""Fault kinds whose `node` may be a list: a wave, several nodes lost within `within_s`."""

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
    """One fault to inject. Fires when the run first reports `at_step`; or, once every fault
    listed before it has fired, with `during="checkpoint_upload"` at the first checkpoint upload
    seen in flight, with `during="reform"` when a live node reaches `phase` of the re-form that
    followed the fault before it.

    A wave (`node` a tuple, kinds in WAVE_KINDS) loses its first node when it fires and each
    other one at a seeded offset within `within_s` seconds after it."""

    kind: FaultKind
    at_step: int | None = None
    during: During | None = None
    node: int | tuple[int, ...] | None = None
    notice_s: float | None = None
    seconds: float | None = None
    within_s: float | None = None
    """A wave: the other nodes are lost within this many seconds of the first (default 0)."""
    phase: Phase | None = None
    """`during: reform`: the phase to fire in (default rendezvous)."""

    @property
    def nodes(self) -> tuple[int, ...]:
        """The targeted nodes (empty: none named)."""
        if self.node is None:
            return ()
        return self.node if isinstance(self.node, tuple) else (self.node,)

    @property
    def is_wave(self) -> bool:
        return isinstance(self.node, tuple)

    def to_dict(self) -> dict[str, Any]:
        """The YAML form: only the keys that are set."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in self.__dict__.items() if v is not None}

    def describe(self) -> str:
        if self.at_step is not None:
            when = f"at step {self.at_step}"
        else:
            when = f"during {self.during}" + (f" ({self.phase})" if self.phase else "")
        where = ""
        if self.is_wave:
            where = f" nodes {','.join(map(str, self.nodes))} within {self.within_s or 0:g} s"
        elif self.node is not None:
            where = f" node {self.node}"
        return f"{self.kind}{where} {when}"


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
    data = dict(data)
    if isinstance(data.get("node"), list):
        if data["kind"] not in WAVE_KINDS:
            raise ScenarioError(f"{where}: node {data['node']}: a list of nodes (a wave) is for "
                                f"{', '.join(sorted(WAVE_KINDS))}, not {data['kind']}")
        if not data["node"] or len(set(data["node"])) != len(data["node"]):
            raise ScenarioError(f"{where}: node {data['node']}: a wave needs distinct nodes")
        data["node"] = tuple(data["node"])
    elif "within_s" in data:
        raise ScenarioError(f"{where}: within_s {data['within_s']}: only a wave (node: a list) "
                            "spreads its losses")
    if "phase" in data and data.get("during") != "reform":
        raise ScenarioError(f"{where}: phase {data['phase']!r}: only a `during: reform` fault "
                            "has a phase")
    if "phase" in data and data["phase"] not in PHASES:
        raise ScenarioError(f"{where}: phase {data['phase']!r} is not one of "
                            f"{', '.join(PHASES)}")
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
    check that every targeted node exists and is alive, that removals never leave fewer than
    min_nodes (nor none), that the cluster never grows beyond max_nodes, and that a `during:
    reform` fault follows a fault that makes the world re-form."""

    def fail(msg: str) -> None:
        raise ScenarioError(f"{source}: {msg}")

    if not s.min_nodes <= s.nodes <= s.max_nodes:
        fail(f"need min_nodes <= nodes <= max_nodes, got {s.min_nodes} <= {s.nodes} <= "
             f"{s.max_nodes}")
    if s.steps < 1:
        fail("train.steps must be >= 1")
    alive = set(range(s.nodes))
    created = s.nodes
    previous: Fault | None = None
    for i, f in firing_order(s.faults):
        label = f"faults.{i} ({f.kind})"
        if f.during == "reform" and (previous is None or previous.kind in NO_REFORM):
            fail(f"{label}: during reform needs a fault before it that makes the world re-form "
                 f"(not {previous.kind if previous else 'none'})")
        previous = f
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
        for node in f.nodes if f.kind in TARGETS_NODE else ():
            if node not in alive:
                state = "was already removed" if node < created else "does not exist yet"
                fail(f"{label}: node {node} {state}")
        if f.kind in REMOVES_NODE:
            lost = set(f.nodes) or {max(alive)}
            if len(alive) - len(lost) < 1:
                fail(f"{label}: removing {len(lost)} node(s) would leave none to train")
            if len(alive) - len(lost) < s.min_nodes:
                fail(f"{label}: removing {len(lost)} of {len(alive)} node(s) would leave fewer "
                     f"than min_nodes={s.min_nodes}")
            alive -= lost


NO_REFORM: frozenset[str] = frozenset({"storage_outage"})
"""Fault kinds after which the world need not re-form (retries absorb an outage)."""


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
