"""The train spec: everything the trainer needs to know about the model it trains.

A spec is a `TrainSpec` value. It builds the model, says which submodules are its blocks (the
units FSDP2 shards, activation checkpointing recomputes and `torch.compile` compiles), computes the
loss of a micro-batch, and may bring its own optimizer, learning-rate schedule and map-style
dataset. Everything else (the elastic world, exact data resume, checkpoints, notices, chaos) is the
trainer's. Nothing outside this module and the spec itself knows which model is trained.

Choosing a spec: `model = "tiny"` names one registered under the `elastic_train.specs` entry-point
group (the built-in GPT sizes `tiny`, `small` and `base` are registered there, and known here
directly so that a source tree that is not installed finds them too); `model =
"package.module:NAME"` imports `package.module` and takes its attribute `NAME`, a `TrainSpec` or a
function of no arguments that returns one.

A minimal spec, a classifier on a dataset it generates:

    def build(ctx: ModelContext) -> nn.Module:
        return MyNet(width=64)

    def loss(model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        features, labels = batch
        logits = model(features)
        return F.cross_entropy(logits, labels, reduction="sum"), labels.numel()

    SPEC = TrainSpec(name="mynet", build_model=build, loss=loss,
                     blocks=lambda m: m.layers, dataset=lambda cfg: MyDataset(cfg.seed))
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # torch is imported by the trainer; `--help` and config checks stay light.
    import torch
    from torch import nn

    from elastic_train.config import Config, OptimConfig

ENTRY_POINT_GROUP = "elastic_train.specs"
"""The entry-point group a package registers its specs in: `name = "package.module:NAME"`."""

BUILTIN: dict[str, str] = {
    "tiny": "elastic_train.model:TINY",
    "small": "elastic_train.model:SMALL",
    "base": "elastic_train.model:BASE",
}
"""The built-in GPT sizes, also registered as entry points in pyproject.toml."""


class SpecError(ValueError):
    """A model reference that names no spec; the message is one line for the user."""


@dataclass(frozen=True)
class ModelContext:
    """What a spec's `build_model` may depend on besides its own constants."""

    config: Config
    """The whole run's configuration (e.g. `data.seq_len`, `seed`)."""
    vocab_size: int | None
    """The prepared token dataset's vocabulary, or None when the spec brings its own dataset."""


class Dataset(Protocol):
    """A map-style dataset: any object with `__len__` and `__getitem__` (a torch `Dataset`).
    Items are collated into micro-batches with `torch.utils.data.default_collate`."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


@dataclass(frozen=True)
class TrainSpec:
    """One model's part of a run. Only `name`, `build_model`, `loss` and `blocks` are required.

    The trainer calls them in this order, on every rank:
    1. `build_model(ctx)`, right after seeding torch with the run's `seed`: the full model on the
       CPU, the same on every rank (the trainer moves and shards it); or, with `init_weights`
       and `parallel.meta_init`, on the meta device, initialised by `init_weights` once sharded.
    2. `shard(model, blocks, fsdp_kwargs)`: applies the sharding plan. The default calls FSDP2's
       `fully_shard` on each of `blocks(model)`, then on the root.
    3. `build_optimizer(model, cfg.optim)` (default: AdamW, weight decay on matrices only) and
       `lr_at(step, total_steps, cfg.optim)` (default: linear warmup, then cosine).
    4. Each step, `loss(model, micro_batch)` for each micro-batch: the loss summed over the
       micro-batch, and the count it is to be normalised by (tokens, samples). The trainer
       divides the step's gradient by the global batch's count, so the gradient is the same at
       any world size and micro-batch size.

    An exception from any of these stops the run (exit code 1 from every rank); the last
    committed checkpoint is untouched.
    """

    name: str
    """Shown in the log and the start event."""
    build_model: Callable[[ModelContext], nn.Module]
    """The full model, initialised from the torch seed the trainer set."""
    loss: Callable[[nn.Module, Any], tuple[torch.Tensor, int]]
    """(loss summed over the micro-batch, count it normalises by). The micro-batch is the
    dataset's items collated with `default_collate`; never empty."""
    blocks: Callable[[nn.Module], Iterable[nn.Module]]
    """The repeated units: sharded, checkpointed and compiled one by one."""
    shard: Callable[[nn.Module, Sequence[nn.Module], dict[str, Any]], None] | None = None
    """The sharding plan; None: `fully_shard` per block, then the root."""
    build_optimizer: Callable[[nn.Module, OptimConfig], torch.optim.Optimizer] | None = None
    """None: AdamW with weight decay on matrices only (elastic_train/optim.py)."""
    lr_at: Callable[[int, int, OptimConfig], float] | None = None
    """Learning rate of a 0-based step; None: linear warmup, then cosine."""
    dataset: Callable[[Config], Dataset] | None = None
    """A map-style dataset instead of prepared token shards (`data.uri` is then ignored). It
    must be the same on every rank and every restart: its items are chosen by the data order's
    pure function of (seed, step), which is what makes resume exact at any world size."""
    init_weights: Callable[[nn.Module], None] | None = None
    """Initialise every parameter and buffer of the model in place, from the torch RNG. Given
    it, the trainer may build the model on the meta device (`parallel.meta_init`), shard it,
    allocate only this rank's shards and then call this on the sharded model, under
    `torch.no_grad()`: it must work on DTensor parameters (the `torch.nn.init` functions and
    module `reset_parameters` do)."""


def names() -> list[str]:
    """Every registered spec name: the built-ins and the entry-point group's."""
    return sorted(set(BUILTIN) | set(registered()))


@functools.cache
def registered() -> dict[str, str]:
    """The entry-point group's specs, name -> "package.module:NAME", read once per process: the
    scan reads every installed distribution's metadata, which each worker start would do again
    (the prefork server reads them before it forks workers)."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def is_reference(ref: str) -> bool:
    """Whether `ref` could name a spec, checked without importing anything."""
    if ":" in ref:
        module, _, attr = ref.partition(":")
        return bool(module) and attr.isidentifier()
    return ref in names()


def resolve(ref: str) -> TrainSpec:
    """The spec `ref` names: a registered name or `package.module:NAME`.

    Raises SpecError (one line naming `ref`) when the name is not registered, the module does not
    import, the attribute is missing, or it is not a TrainSpec. An exception raised while the
    module itself runs is not caught: it is the spec's bug, and its traceback says where."""
    target = ref
    if ":" not in ref:
        target = registered().get(ref) or BUILTIN.get(ref, "")
        if not target:
            raise SpecError(f"model={ref!r} is not a registered spec; expected one of "
                            f"{', '.join(names())} or package.module:NAME")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not module_name.startswith(e.name):
            raise
        raise SpecError(f"model={ref!r}: no module named {e.name!r} (is it installed or on "
                        "PYTHONPATH?)") from None
    found = getattr(module, attr, None)
    if found is None:
        raise SpecError(f"model={ref!r}: module {module_name!r} has no attribute {attr!r}")
    if inspect.isfunction(found):
        found = found()
    if not isinstance(found, TrainSpec):
        what = f"class {found.__name__}" if isinstance(found, type) else type(found).__name__
        raise SpecError(f"model={ref!r} is a {what}, expected a TrainSpec (or a function of no "
                        "arguments that returns one)")
    return found


def fresh_model(spec: TrainSpec, config: Config, vocab_size: int | None) -> nn.Module:
    """The spec's full model as every rank builds it before sharding: torch seeded with the run's
    `seed`, then `build_model`. Raises what `build_model` raises."""
    import torch

    torch.manual_seed(config.seed)
    return spec.build_model(ModelContext(config, vocab_size))
