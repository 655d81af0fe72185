"""Typed configuration: dataclasses, a TOML file, and `--section.key value` overrides.

Precedence is one rule: command line > TOML file > defaults. Every key is checked when the run
starts: an unknown key, a value of the wrong type or an impossible value raises `ConfigError`
with one line that names the key, the bad value and what was expected.

The keys `model`, `steps`, `seed` and `checkpoint.every` are a contract: chaos scenarios and the
SkyPilot YAMLs set them by these names.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import difflib
import hashlib
import inspect
import json
import os
import sys
import textwrap
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from checkpointing import config as checkpointing_config
from checkpointing.storage import check_uri
from elastic_train import spec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

class ConfigError(ValueError):
    """A configuration the run cannot start with; the message is one line for the user."""


@dataclass
class RunConfig:
    dir: str = "runs/local"
    """Local directory for metrics.jsonl, the final weights and logs (rank 0 writes)."""
    log_every: int = 10
    """Rank 0 prints a progress line every this many steps."""
    threads: int = 1
    """torch intra-op threads per worker (CPU). Keep workers x threads <= cores."""
    name: str = ""
    """The run's name (the W&B run id). Empty: made from the checkpoint URI, which is the same
    on every relaunch."""
    flush_s: float = 5.0
    """Rank 0 writes the metrics lines it holds as a new segment under the checkpoint URI this
    often (and at once after a commit). A killed rank 0 loses at most this many seconds of
    lines that were not committed."""
    tensorboard: bool = False
    """Write TensorBoard event files under `{checkpoint.uri}/tensorboard/` (extra
    `tensorboard`)."""
    wandb: bool = False
    """Log to Weights & Biases, run id `run.name`, resumed on relaunch (extra `wandb`; W&B
    reads WANDB_API_KEY / WANDB_MODE from the environment)."""
    wandb_project: str = "elastic-train"
    """The W&B project of the run."""


@dataclass
class DataConfig:
    uri: str = ""
    """Prepared dataset (`elastic-train data prepare`): s3://, gs://, file:// or a path.
    Empty: the embedded corpus is prepared under `{run.dir}/data` on first use."""
    seq_len: int = 128
    """Tokens per sample (a sample holds seq_len + 1 tokens: inputs and shifted targets)."""
    batch_size: int = 16
    """Global batch in samples. Independent of the world size: ranks split it between them."""
    micro_batch: int = 0
    """Samples per forward/backward on one rank (fixes memory per rank). Each step runs
    ceil(batch_size / (world x micro_batch)) micro-batches and accumulates their gradients, so a
    shrinking world lengthens the step instead of growing it. 0: a rank's whole share at once."""
    prefetch: int = 2
    """Steps of data fetched ahead in a background thread."""


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate of AdamW, reached after `warmup_steps`."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr * min_lr_ratio at the last step."""
    warmup_steps: int = 20
    """Steps of linear warmup from lr / warmup_steps to lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, on weight matrices only (not norms, not biases)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""


@dataclass
class CheckpointConfig(checkpointing_config.CheckpointConfig):
    """The `[checkpoint]` section: the checkpoint manager's settings, declared once in
    `checkpointing.config.CheckpointConfig` (keep, mode, when_busy, on_failure, cache_dir,
    retry_timeout_s; its `TUNING` fields keep their defaults and are not keys here), plus where
    and when this worker saves. The manager takes the whole section and ignores the keys below."""

    uri: str = ""
    """Where checkpoints go: s3://bucket/prefix, gs://..., file://...
    Empty: `{run.dir}/checkpoints`."""
    every: int = 50
    """Save every this many steps (0: only the final step). See `interval` for adaptive mode."""
    interval: Literal["fixed", "adaptive"] = "fixed"
    """fixed: every `every` steps. adaptive: Young/Daly sqrt(2*C*M) from measured checkpoint cost
    C and mean time between interruptions M, between min_every and max_every."""
    min_every: int = 5
    """Adaptive interval: never save more often than this many steps."""
    max_every: int = 500
    """Adaptive interval: never go longer than this many steps without a save."""
    prior_mtbi_s: float = 0.0
    """Adaptive interval: expected seconds between interruptions before any is seen (e.g. 3600
    for spot capacity). 0: no prior; until the first interruption the interval is max_every."""
    shared_filesystem: bool = False
    """A file:// (or plain path) URI with more than one node: true states that every node sees
    the same directory (NFS, a shared mount). Checked at start with a probe file; without it,
    such a run is refused (each node would commit shards the others cannot read)."""
    allow_data_change: bool = False
    """Resume a checkpoint whose data order differs (seed, data.batch_size, data.seq_len,
    dataset). false: such a resume is refused naming the key. true: allowed, and recorded as a
    `data_changed` event in metrics (the ledger and the chaos invariants see it)."""

    def validate(self, prefix: str = "") -> None:
        """The manager's checks, then this section's; ValueError names the first bad key."""
        super().validate(prefix)
        checks = [
            (self.every >= 0, f"{prefix}every={self.every} must be >= 0"),
            (1 <= self.min_every <= self.max_every,
             f"{prefix}min_every={self.min_every} and {prefix}max_every={self.max_every} "
             "must satisfy 1 <= min_every <= max_every"),
            (self.prior_mtbi_s >= 0, f"{prefix}prior_mtbi_s={self.prior_mtbi_s} must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.uri:
            check_uri(self.uri, f"{prefix}uri")


@dataclass
class ParallelConfig:
    mixed_precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: fp32 on CPU (bf16 is slower without bf16 instructions); bf16 params with fp32
    gradient reduction on GPU."""
    collective_timeout_s: float = 0.0
    """A collective that takes longer fails the worker, the checkpoint's included. 0: 20 s with
    gloo, 600 s with NCCL (communicator setup and a save's upload skew wait in collectives).
    The last resort: a vanished node is found by its heartbeats and a hung step by the step
    timer, both sooner (docs/internals.md, "Timeouts")."""
    hang_timeout_s: float = 8.0
    """The least time a step may take before it is a hang and the node's watchdog kills the
    worker; slow steps get 5 x the p99 of recent ones instead, and a process's first steps the
    collective timeout. Longer than a lapsed rendezvous heartbeat (a vanished peer re-forms the
    world first, spending no restart). 0: off."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them: less
    memory for about one more forward."""
    compile: bool = False
    """torch.compile each block (needs a C++ compiler on CPU, Triton on GPU); the first steps
    are slower while it compiles."""
    meta_init: Literal["auto", "on", "off"] = "auto"
    """For a spec with `init_weights`: build the model on the meta device, shard it, then
    allocate and initialise only this rank's shards (no rank ever holds the whole model).
    auto: where DTensor's random ops give the same weights at any world size (CUDA-like
    devices); on: also elsewhere (on CPU the initial weights then depend on the world size);
    off: build the whole model on every rank, then shard it."""


@dataclass
class NoticesConfig:
    """Where the worker looks for preemption notices (elastic_train/notices.py). The `file`
    source's path is not a key: the node launcher sets ELASTIC_TRAIN_NOTICE_FILE for its
    workers."""

    sources: str = ""
    """Comma-separated sources polled (aws, gcp, azure, skypilot, file, signal). Empty:
    file, signal, skypilot and the cloud SkyPilot names in SKYPILOT_CLUSTER_INFO. file and
    signal are always added."""
    interval_s: float = 1.0
    """Seconds between two polls of every source."""
    timeout_s: float = 0.3
    """HTTP timeout of one metadata-server request."""
    aws_url: str = ""
    """Base URL of EC2's instance metadata service. Empty: the link-local address."""
    gcp_url: str = ""
    """Base URL of GCE's metadata server. Empty: the link-local address."""
    azure_url: str = ""
    """Base URL of Azure's instance metadata service. Empty: the link-local address."""
    skypilot_claim_file: str = ""
    """The file skylet writes before running preemption hooks. Empty: SkyPilot's own path."""


@dataclass
class Config:
    model: str = "tiny"
    """The train spec: a registered name (built-in GPT sizes tiny ~1M params, small ~10M,
    base ~100M) or package.module:NAME."""
    steps: int = 200
    """Optimizer steps of the whole run (the target step)."""
    seed: int = 0
    """Seeds the weights and the data order; same seed and world size give bit-identical runs."""
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    notices: NoticesConfig = field(default_factory=NoticesConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A hash of everything that changes the math of the run (not where files go)."""
        d = self.to_dict()
        math = {k: d[k] for k in ("model", "steps", "seed", "optim", "parallel")}
        # micro_batch is left out: it changes memory, not the step's gradient (up to rounding).
        math["data"] = {k: d["data"][k] for k in ("seq_len", "batch_size")}
        return hashlib.sha256(json.dumps(math, sort_keys=True).encode()).hexdigest()[:16]


def _all_keys(cls: type = Config, prefix: str = "") -> dict[str, type]:
    """Dotted key -> field type, for every leaf of the config (not the checkpoint manager's
    `TUNING` fields: they keep their defaults)."""
    hints = typing.get_type_hints(cls)
    keys: dict[str, type] = {}
    for f in dataclasses.fields(cls):
        if checkpointing_config.is_tuning(f):
            continue
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys.update(_all_keys(t, f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = t
    return keys


@dataclass(frozen=True)
class KeyDoc:
    """One config key as `--help` and the README show it."""

    key: str
    type: str
    """int, float, str, bool, or the allowed values a|b|c."""
    default: Any
    doc: str
    """The field's attribute docstring, on one line."""


def _attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring under it in the class body (and its bases'), one line each."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0]
        assert isinstance(body, ast.ClassDef)
        for node, after in zip(body.body, body.body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _type_name(t: Any) -> str:
    if typing.get_origin(t) is Literal:
        return "|".join(map(str, typing.get_args(t)))
    return getattr(t, "__name__", str(t))


def describe(cls: type = Config, prefix: str = "", instance: Any = None) -> list[KeyDoc]:
    """Every key of the config in declaration order, with type, default and doc: the one source
    of `train --help` and the README's table."""
    instance = cls() if instance is None else instance
    hints = typing.get_type_hints(cls)
    docs = _attribute_docs(cls)
    out: list[KeyDoc] = []
    for f in dataclasses.fields(cls):
        if checkpointing_config.is_tuning(f):
            continue
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out += describe(hints[f.name], f"{prefix}{f.name}.", value)
        else:
            out.append(KeyDoc(f"{prefix}{f.name}", _type_name(hints[f.name]), value,
                              docs.get(f.name, "")))
    return out


def markdown_table() -> str:
    """The README's configuration table (`python -m elastic_train.config` prints it)."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for k in describe():
        default = f"`{k.default}`" if k.default != "" else '`""`'
        rows.append(f"| `{k.key}` | {k.type} | {default} | {k.doc.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


OVERRIDE_DEST = "config:"
"""Prefix of the argparse destinations that hold config overrides (see `add_arguments`)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config FILE` and one option per key, grouped by section, for `--help`. Values stay
    strings (`load` types and checks them, with its one-line errors); an option not given is
    absent from the namespace. Collect them with `overrides_from`."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="TOML file of keys below (sections as tables); the command line "
                             "beats the file, which beats the defaults")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for k in describe():
        section = k.key.split(".")[0] if "." in k.key else ""
        if section not in groups:
            groups[section] = parser.add_argument_group(
                f"[{section}]" if section else "run-wide keys")
        metavar = "{" + k.type.replace("|", ",") + "}" if "|" in k.type else k.type.upper()
        groups[section].add_argument(
            f"--{k.key}", dest=OVERRIDE_DEST + k.key, default=argparse.SUPPRESS,
            metavar=metavar, help=f"{k.doc} (default: {k.default!r})".replace("%", "%%"))


def overrides_from(args: argparse.Namespace, rest: list[str]) -> dict[str, Any]:
    """The overrides of a command line parsed with `add_arguments`: the options argparse took,
    then the rest (`--section.key=value` spelled with dashes, or an unknown key, which `load`
    then names)."""
    taken = {name[len(OVERRIDE_DEST):]: value for name, value in vars(args).items()
             if name.startswith(OVERRIDE_DEST)}
    return {**taken, **parse_overrides(rest)}


def _coerce(key: str, value: Any, t: type) -> Any:
    """Turn a TOML value or a command-line string into the field's type, or say why not."""
    origin = typing.get_origin(t)
    if origin is Literal:
        allowed = typing.get_args(t)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    try:
        if t is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if t is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if t is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a valid {t.__name__}") from None


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in table.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def apply(config: Config, overrides: dict[str, Any]) -> Config:
    """Set dotted keys on a copy of `config`; raises ConfigError naming the first bad key."""
    keys = _all_keys()
    # Sections are copied, not rebuilt: a section that checks itself on construction must not
    # refuse a bad file value that the command line is about to fix (`validate` runs last).
    config = dataclasses.replace(
        config, **{f.name: copy.copy(getattr(config, f.name))
                   for f in dataclasses.fields(config)
                   if dataclasses.is_dataclass(getattr(config, f.name))}
    )
    for key, value in overrides.items():
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint}")
        *path, leaf = key.split(".")
        target = config
        for part in path:
            target = getattr(target, part)
        setattr(target, leaf, _coerce(key, value, keys[key]))
    return config


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--a.b=1 --c 2` -> {"a.b": "1", "c": "2"}; values stay strings until `apply` types them."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(
                f"unexpected argument {arg!r}: overrides look like --section.key=value"
            )
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value")
            i += 1
            value = args[i]
        overrides[key.replace("-", "_")] = value
        i += 1
    return overrides


def load(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the TOML file at `path`, then `overrides`; validated."""
    config = Config()
    if path:
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path!r} is not valid TOML: {e}") from None
        config = apply(config, _flatten(table))
    config = apply(config, overrides or {})
    validate(config)
    return config


def checkpoint_uri(config: Config) -> str:
    """`checkpoint.uri`, or `{run.dir}/checkpoints` when it is empty: where the run lives."""
    if config.checkpoint.uri:
        return config.checkpoint.uri
    return "file://" + os.path.abspath(os.path.join(config.run.dir, "checkpoints"))


def validate(config: Config, world_size: int | None = None) -> None:
    """Raise ConfigError for values no run can start with (world_size: checked when known)."""
    checks: list[tuple[bool, str]] = [
        (spec.is_reference(config.model),
         f"model={config.model!r} is not a registered spec; expected one of "
         f"{', '.join(spec.names())} or package.module:NAME"),
        (config.steps >= 1, f"steps={config.steps} must be >= 1"),
        (config.data.seq_len >= 1, f"data.seq_len={config.data.seq_len} must be >= 1"),
        (config.data.batch_size >= 1, f"data.batch_size={config.data.batch_size} must be >= 1"),
        (config.data.micro_batch >= 0,
         f"data.micro_batch={config.data.micro_batch} must be >= 0 (0: no accumulation)"),
        (config.data.prefetch >= 0, f"data.prefetch={config.data.prefetch} must be >= 0"),
        (config.optim.lr > 0, f"optim.lr={config.optim.lr} must be > 0"),
        (0 <= config.optim.min_lr_ratio <= 1,
         f"optim.min_lr_ratio={config.optim.min_lr_ratio} must be in [0, 1]"),
        (config.optim.warmup_steps >= 0,
         f"optim.warmup_steps={config.optim.warmup_steps} must be >= 0"),
        (config.optim.grad_clip >= 0, f"optim.grad_clip={config.optim.grad_clip} must be >= 0"),
        (config.run.log_every >= 1, f"run.log_every={config.run.log_every} must be >= 1"),
        (config.run.threads >= 1, f"run.threads={config.run.threads} must be >= 1"),
        (config.notices.interval_s > 0,
         f"notices.interval_s={config.notices.interval_s} must be > 0"),
        (config.notices.timeout_s > 0,
         f"notices.timeout_s={config.notices.timeout_s} must be > 0"),
        (config.run.flush_s > 0, f"run.flush_s={config.run.flush_s} must be > 0"),
    ]
    if world_size is not None:
        checks.append((
            config.data.batch_size >= world_size,
            f"data.batch_size={config.data.batch_size} is smaller than the world size "
            f"{world_size}: every rank needs at least one sample per step",
        ))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    try:
        config.checkpoint.validate(prefix="checkpoint.")
        if config.data.uri:
            check_uri(config.data.uri, "data.uri")
    except ValueError as e:
        raise ConfigError(str(e)) from None


if __name__ == "__main__":
    print(markdown_table(), end="")
