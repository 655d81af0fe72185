"""Typed configuration: dataclasses, a TOML file, and `--section.key value` overrides.

Precedence is one rule: command line > TOML file > defaults. Every key is checked when the run
starts: an unknown key, a value of the wrong type or an impossible value raises `ConfigError`
with one line that names the key, the bad value and what was expected.

The keys `model`, `steps`, `seed` and `checkpoint.every` are a contract: chaos scenarios and the
SkyPilot YAMLs set them by these names.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from checkpointing import config as checkpointing_config
from checkpointing.storage import check_uri

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MODEL_SIZES = ("tiny", "small", "base")


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


@dataclass
class DataConfig:
    uri: str = ""
    """Prepared dataset (`elastic-train data prepare`): s3://, gs://, file:// or a path.
    Empty: the embedded corpus is prepared under `{run.dir}/data` on first use."""
    seq_len: int = 128
    """Tokens per sample (a sample holds seq_len + 1 tokens: inputs and shifted targets)."""
    batch_size: int = 16
    """Global batch in samples. Independent of the world size: ranks split it between them."""
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
    """A collective that takes longer fails the worker. 0: 20 s with gloo, 600 s with NCCL."""
    hang_timeout_s: float = 0.0
    """A step that takes longer is a hang: torchrun's file timer kills the worker. 0: off."""


@dataclass
class Config:
    model: str = "tiny"
    """Model size: tiny (~1M params), small (~10M), base (~100M)."""
    steps: int = 200
    """Optimizer steps of the whole run (the target step)."""
    seed: int = 0
    """Seeds the weights and the data order; same seed and world size give bit-identical runs."""
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A hash of everything that changes the math of the run (not where files go)."""
        d = self.to_dict()
        math = {k: d[k] for k in ("model", "steps", "seed", "optim", "parallel")}
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


def validate(config: Config, world_size: int | None = None) -> None:
    """Raise ConfigError for values no run can start with (world_size: checked when known)."""
    checks: list[tuple[bool, str]] = [
        (config.model in MODEL_SIZES,
         f"model={config.model!r} is not a known size; expected one of {', '.join(MODEL_SIZES)}"),
        (config.steps >= 1, f"steps={config.steps} must be >= 1"),
        (config.data.seq_len >= 1, f"data.seq_len={config.data.seq_len} must be >= 1"),
        (config.data.batch_size >= 1, f"data.batch_size={config.data.batch_size} must be >= 1"),
        (config.data.prefetch >= 0, f"data.prefetch={config.data.prefetch} must be >= 0"),
        (config.optim.lr > 0, f"optim.lr={config.optim.lr} must be > 0"),
        (0 <= config.optim.min_lr_ratio <= 1,
         f"optim.min_lr_ratio={config.optim.min_lr_ratio} must be in [0, 1]"),
        (config.optim.warmup_steps >= 0,
         f"optim.warmup_steps={config.optim.warmup_steps} must be >= 0"),
        (config.optim.grad_clip >= 0, f"optim.grad_clip={config.optim.grad_clip} must be >= 0"),
        (config.run.log_every >= 1, f"run.log_every={config.run.log_every} must be >= 1"),
        (config.run.threads >= 1, f"run.threads={config.run.threads} must be >= 1"),
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
