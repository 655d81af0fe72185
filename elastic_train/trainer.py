"""The Trainer: composes model, data stream, optimizer and checkpoints into the step loop.

The model, its loss, optimizer and schedule come from the train spec (`elastic_train.spec`) that
`model` names; nothing here knows which model it trains.

One step, on every rank: take this rank's share of global batch `s`, cut it into the same number
of micro-batches on every rank (`data.micro_batch`), forward and backward each with the loss
summed, gradient sync only on the last, then one small all-reduce that carries the loss, the
count it normalises by (tokens or samples of the whole global batch) and the save policy's votes
(whether any node has a preemption notice, whether rank 0 wants this step saved). The summed
gradient is divided by that count, clipped, and the optimizer steps: the step's gradient is the
full batch's mean at any world size and micro-batch size.

What happens on failure:
- A peer's node vanishes: its agent's heartbeats stop, and every surviving agent stops its
  workers (SIGKILL) and re-forms the world without it. A peer that crashed: the next collective
  raises; the worker exits with `COLLECTIVE_TIMEOUT` and torchrun re-forms the world. Either way
  every worker then resumes from the newest committed checkpoint.
- A step overruns its timer (`StepTimer`: at least `parallel.hang_timeout_s`, more for slow
  steps): the node's watchdog kills the worker (SIGKILL). A collective slower than
  `parallel.collective_timeout_s` fails the worker. docs/internals.md, "Timeouts", has the
  order in which these fire.
- SIGTERM (torchrun stopping the group): the worker exits at once, doing no collective work,
  so the agent never waits out its 30 s shutdown grace. An upload in flight is abandoned; it
  was never committed, so nobody will load it.
- A preemption notice on any node: all ranks agree at the next step boundary, save within the
  notice's deadline, and the noticed node leaves; the others go on in a smaller world.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import signal
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.fsdp import FSDPModule
from torch.utils.data import default_collate

from checkpointing import CheckpointManager, ModelOptimizerState
from checkpointing.errors import StorageError
from elastic_train import data, distributed, exit_codes
from elastic_train.config import Config, ConfigError, ParallelConfig, checkpoint_uri, validate
from elastic_train.dashboards import build_dashboards, check_packages
from elastic_train.events import Event
from elastic_train.goodput import store
from elastic_train.metrics import MetricsLog, progress_line, say
from elastic_train.node.contract import AGENT_PID_ENV
from elastic_train.notices import Notice
from elastic_train.optim import build_optimizer, lr_at
from elastic_train.run_store import RunStore, SegmentSink
from elastic_train.save_policy import Save, build_save_policy
from elastic_train.spec import Dataset, SpecError, TrainSpec, fresh_model, resolve

POLICY_KEY = "policy"
"""The save policy's entry in a checkpoint, beside "app" (model and optimizer) and "trainer"."""
DATA_ORDER_KEY = "data_order"
"""What fixed the data stream, beside "trainer" (an entry of its own, so that a checkpoint
written before it existed still loads: its order is then taken on trust)."""


class DataOrder(Stateful):
    """The checkpoint's record of what fixes the data stream: seed, global batch, sequence length
    and the dataset's identity. Loading a record that differs raises ConfigError naming the
    first key that differs, unless `allow_change` (then `changed` holds every difference, for the
    run to record)."""

    def __init__(self, now: dict[str, Any], allow_change: bool) -> None:
        self.now = now
        self.allow_change = allow_change
        self.changed: dict[str, dict[str, Any]] = {}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.now)

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        changed = {key: {"checkpoint": saved.get(key), "now": now}
                   for key, now in self.now.items() if saved.get(key) != now}
        if changed and not self.allow_change:
            key, values = next(iter(changed.items()))
            raise ConfigError(f"the checkpoint was written with {key}={values['checkpoint']!r}, "
                              f"this run has {key}={values['now']!r}: resuming would change the "
                              "data order (set checkpoint.allow_data_change=true to accept that)")
        self.changed = changed


def _exit_on_sigterm() -> None:
    # os._exit, not sys.exit: a background upload thread must not keep the process alive, and
    # no collective may run. The checkpoint in flight has no commit marker, so it never counts.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(128 + signal.SIGTERM))


HANG_STEP_FACTOR = 5.0
"""A step counts as a hang once it took this many times the p99 of the recent steps (and at least
`parallel.hang_timeout_s`): room for a GC pause, a deferred checkpoint copy or a slow batch."""
HANG_WINDOW = 100
"""Recent steps the p99 is taken over."""
HANG_WARMUP_STEPS = 2
"""Steps measured, after the first, before the timer sizes itself from them."""


class StepTimer:
    """Bounds every step: the node's watchdog (elastic_train/node/watchdog.py, serving the FIFO at
    TORCHELASTIC_TIMER_FILE) SIGKILLs this worker when a step overruns `timeout_s()` (a hung
    peer or local hang, or this process stopped); its agent then restarts the node's workers.

    The bound is max(`floor_s`, HANG_STEP_FACTOR x p99 of the last HANG_WINDOW steps), measured in
    this process (a new world has new step times). The first step of a process compiles,
    allocates and connects: it may take `first_steps_s` (the collective timeout, which bounds it
    anyway). Until HANG_WARMUP_STEPS more are measured, a step may take HANG_STEP_FACTOR x the
    first one (at least the floor, at most `first_steps_s`): a hang right after a restart is
    then found by the floor, not by the collective timeout. A checkpoint load runs before the
    first step and a save between steps: neither is timed.

    Disabled when `floor_s` is 0 or no watchdog serves a FIFO. A watchdog that is not (or no
    longer) there leaves steps untimed, with one warning, rather than failing them: it starts
    alongside the node's agent, not before it."""

    def __init__(self, floor_s: float, first_steps_s: float, client: Any = None,
                 clock: Callable[[], float] = time.monotonic,
                 waited_s: Callable[[], float] = lambda: 0.0) -> None:
        self.floor_s, self.first_steps_s = floor_s, first_steps_s
        self.client = client
        self.clock = clock
        self.waited_s = waited_s
        """Seconds this process has waited so far on something other than its step (the
        checkpoint's fence): taken out of the step times the bound is sized from, so that a
        step held up by a save (a storage outage) does not stretch the bound for the next
        HANG_WINDOW steps."""
        self.recent: deque[float] = deque(maxlen=HANG_WINDOW)
        self.first_s: float | None = None
        """How long this process's first step took."""
        self._warned = False

    def timeout_s(self) -> float:
        """Seconds the next step may take (0: untimed)."""
        if self.floor_s <= 0:
            return 0.0
        if self.first_s is None:
            return max(self.floor_s, self.first_steps_s)
        if len(self.recent) < HANG_WARMUP_STEPS:
            return max(self.floor_s, min(self.first_steps_s, HANG_STEP_FACTOR * self.first_s))
        ordered = sorted(self.recent)
        p99 = ordered[math.ceil(0.99 * len(ordered)) - 1]
        return max(self.floor_s, HANG_STEP_FACTOR * p99)

    def observe(self, seconds: float) -> None:
        """A step took `seconds`; the first one of the process is kept apart (see above)."""
        if self.first_s is None:
            self.first_s = seconds
        else:
            self.recent.append(seconds)

    @contextmanager
    def __call__(self) -> Iterator[None]:
        """Time one step: armed on entry, released and measured on exit."""
        timeout = self.timeout_s()
        armed = False
        if timeout > 0 and self.client is not None:
            try:
                self.client.acquire("step", time.time() + timeout)
                armed = True
            except BrokenPipeError:
                if not self._warned:
                    say("warning: no hang watchdog serves TORCHELASTIC_TIMER_FILE yet; "
                        "this step runs untimed")
                    self._warned = True
        began, waited = self.clock(), self.waited_s()
        try:
            yield
        finally:
            self.observe(self.clock() - began - (self.waited_s() - waited))
            if armed:
                with suppress(BrokenPipeError):
                    self.client.release("step")


def build_step_timer(cfg: ParallelConfig, backend: str,
                     checkpoints: CheckpointManager) -> StepTimer:
    """The step timer of `parallel.hang_timeout_s`, on the FIFO at TORCHELASTIC_TIMER_FILE; the
    time a step waits at the checkpoint's fence is not counted as the step's."""
    path = os.environ.get("TORCHELASTIC_TIMER_FILE")
    client = None
    if cfg.hang_timeout_s > 0 and path:
        from torch.distributed.elastic.timer import FileTimerClient

        client = FileTimerClient(path)
    return StepTimer(cfg.hang_timeout_s, distributed.collective_timeout(cfg, backend), client,
                     waited_s=lambda: float(checkpoints.metrics["fence_wait_s"]))


def _process_age_s() -> float:
    """Seconds since this process began (Linux: to the clock tick; elsewhere 0)."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def _to_device(batch: Any, device: torch.device) -> Any:
    """A collated micro-batch (tensors in tuples, lists, dicts) with its tensors on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def build_run_home(config: Config, world: distributed.World) -> SegmentSink | None:
    """Rank 0: the sink that keeps the run's history (and its dashboards) under the checkpoint
    URI (`run_store`); None on other ranks. Raises ConfigError when a dashboard's package is
    missing (on every rank)."""
    check_packages(config)
    if not world.is_main:
        return None
    store = RunStore(checkpoint_uri(config))
    return SegmentSink(store, config.run.flush_s, build_dashboards(config, store))


def build_metrics(config: Config, world: distributed.World, home: SegmentSink | None
                  ) -> MetricsLog:
    """metrics.jsonl under run.dir and the run's home, written by rank 0; other ranks' log
    writes nothing."""
    if not world.is_main:
        return MetricsLog(None)
    return MetricsLog(os.path.join(config.run.dir, "metrics.jsonl"), [home] if home else [])


def build_spec(config: Config) -> TrainSpec:
    """The train spec `model` names; raises ConfigError (one line) when it names none."""
    try:
        return resolve(config.model)
    except SpecError as e:
        raise ConfigError(str(e)) from None


def build_dataset(config: Config, spec: TrainSpec, world: distributed.World
                  ) -> tuple[Dataset, int | None]:
    """The spec's own map-style dataset (vocabulary None), else the prepared token shards at
    `data.uri`, or the embedded corpus prepared under run.dir on first use. Each node's first
    worker prepares it (identical bytes, atomic writes), then all wait (a collective: raises as
    one does when a peer is gone)."""
    if spec.dataset is not None:
        return spec.dataset(config), None
    uri = config.data.uri
    if not uri:
        uri = os.path.abspath(os.path.join(config.run.dir, "data"))
        if world.local_rank == 0 and not data.is_prepared(uri):
            data.prepare(uri)
        dist.barrier()
    try:
        store = data.TokenStore(uri, retry_timeout_s=config.checkpoint.retry_timeout_s)
    except FileNotFoundError as e:
        raise ConfigError(f"data.uri: {e}") from None
    return data.TokenDataset(store, config.data.seq_len), store.vocab_size


def start_storage_check(config: Config, checkpoints: CheckpointManager) -> None:
    """Before the restore: a file:// run on several nodes must declare
    `checkpoint.shared_filesystem=true` (ConfigError, one line naming the URI, otherwise); rank 0
    starts probing the checkpoint URI and claiming the writer epoch, which `check_storage` waits
    for, so that those requests overlap the restore."""
    nodes = _node_count()
    if checkpoints.storage.is_local and nodes > 1 and not config.checkpoint.shared_filesystem:
        raise ConfigError(f"checkpoint.uri={checkpoints.uri!r} is a local path on {nodes} nodes: "
                          "use s3:// or gs://, or set checkpoint.shared_filesystem=true if every "
                          "node mounts the same directory")
    checkpoints.start_storage_check()


def _node_count() -> int:
    """Nodes in this world (torchrun's GROUP_WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("GROUP_WORLD_SIZE", "1"))


def check_storage(world: distributed.World, checkpoints: CheckpointManager) -> None:
    """Before step 1 (collective): rank 0's probe of the checkpoint URI (a write, read and delete)
    and its writer epoch (`start_storage_check`) are done; on a file:// run of several nodes,
    every node's local rank 0 sees a probe file rank 0 wrote. Raises ConfigError (one line
    naming the URI) on every rank otherwise."""
    try:
        checkpoints.check_storage()
    except StorageError as e:
        raise ConfigError(f"checkpoint storage is not usable: {e}") from None
    if not checkpoints.storage.is_local or _node_count() <= 1:
        return
    uri = checkpoints.uri
    probe = f"_shared/{uuid.uuid4().hex}" if world.is_main else ""
    if world.is_main:
        checkpoints.storage.write_bytes(probe, b"shared?")
    box = [probe]
    dist.broadcast_object_list(box, src=0)
    seen = world.local_rank != 0 or checkpoints.storage.exists(box[0])
    flags = [None] * world.size
    dist.all_gather_object(flags, seen)
    if world.is_main:
        checkpoints.storage.remove_tree("_shared")
    if not all(flags):
        missing = sorted(r for r, ok in enumerate(flags) if not ok)
        raise ConfigError(f"checkpoint.shared_filesystem=true but ranks {missing} do not see "
                          f"{uri}/{box[0]}, written by rank 0: the path is not shared")


def build_model(config: Config, spec: TrainSpec, vocab_size: int | None,
                world: distributed.World) -> tuple[nn.Module, int]:
    """The spec's model built from `seed` (the same full model on every rank), then moved and
    sharded; or, with `parallel.meta_init` (`distributed.uses_meta_init`), built on the meta
    device, sharded, and only this rank's shards allocated and initialised. With its parameter
    count."""
    if meta := distributed.uses_meta_init(spec, config.parallel, world.device):
        with torch.device("meta"):
            model = fresh_model(spec, config, vocab_size)
    else:
        model = fresh_model(spec, config, vocab_size)
    n_params = sum(p.numel() for p in model.parameters())
    model = distributed.shard(model, spec, world, config.parallel)
    if meta:
        assert spec.init_weights is not None  # uses_meta_init checked it
        distributed.materialise(model, spec.init_weights, config.seed, world)
    return model, n_params


def build_checkpointer(config: Config, world: distributed.World,
                       on_event: Callable[[dict[str, Any]], None]) -> CheckpointManager:
    """The run's checkpoint manager (collective: build it on every rank, in the same order). Its
    collectives (DCP's included) wait for a peer as long as the training ones do."""
    timeout_s = distributed.collective_timeout(config.parallel, world.backend)
    return CheckpointManager(checkpoint_uri(config),
                             dataclasses.replace(config.checkpoint, collective_timeout_s=timeout_s),
                             config_digest=config.digest(), on_event=on_event)


def build_ledger(config: Config, home: SegmentSink | None) -> store.LedgerWriter | None:
    """Rank 0 keeps ledger.json beside the checkpoints current, for goodput reports: computed
    from the run's whole history under its URI, after each segment holding a commit."""
    if home is None:
        return None
    ledger = store.LedgerWriter(checkpoint_uri(config), home.store.records)
    home.consumers.append(ledger.on_batch)
    return ledger


def sample_fingerprint(item: Any) -> int:
    """A 48-bit digest of one dataset item as this rank holds it (every tensor and number in it,
    in order): small enough that a sum of a few stays exact in a float64."""
    digest = hashlib.blake2b(digest_size=6)
    for leaf in _leaves(item):
        if isinstance(leaf, torch.Tensor):
            digest.update(leaf.detach().to("cpu").contiguous().view(-1).view(torch.uint8)
                          .numpy().tobytes())
        else:
            digest.update(repr(leaf).encode())
    return int.from_bytes(digest.digest(), "little")


def _leaves(item: Any) -> Iterator[Any]:
    if isinstance(item, dict):
        for key in sorted(item):
            yield from _leaves(item[key])
    elif isinstance(item, (tuple, list)):
        for part in item:
            yield from _leaves(part)
    else:
        yield item


def consumed_fingerprints(batch: data.Batch, batch_size: int, world: distributed.World
                          ) -> torch.Tensor:
    """This rank's part of the global batch's fingerprints: one per sample, at the positions of
    the rows this rank trains on (zero elsewhere), taken from the tokens the data stream handed
    over. Summed over the world (the step's all-reduce), every position holds the fingerprint of
    the sample some rank actually trained on there: a rank that read the wrong samples, too few
    or the same as another changes the sum, so the chaos harness can compare it with what the
    reference run consumed (the step line's `consumed`)."""
    out = torch.zeros(batch_size, dtype=torch.float64)
    share = data.rank_slice(batch_size, world.size, world.rank)
    rows = [sample_fingerprint(item) for item in batch.items]
    out[share.start:share.start + len(rows)] = torch.tensor(rows, dtype=torch.float64)
    return out


def data_digest(fingerprints: list[float]) -> str:
    """The step line's `consumed`: a digest of the summed fingerprints, in batch order."""
    values = np.asarray([int(f) for f in fingerprints], dtype="<i8")
    return hashlib.sha256(values.tobytes()).hexdigest()[:16]


class Trainer(Stateful):
    """Wires the parts made by the `build_*` factories, runs the step loop, and is itself the
    checkpoint's `trainer` entry: the step (all the data stream needs) and the config digest.

    Construct it on every rank of the world torchrun started (or alone, as a world of one);
    raises `ConfigError` for a config the world cannot run, and what a collective raises when a
    peer is gone. Call `close()` when done, whatever `run()` did."""

    def __init__(self, config: Config) -> None:
        _exit_on_sigterm()
        # Where a (re)start spends its time, for the "start" event: process birth (a fork of
        # the node's prefork server, or a cold interpreter) -> process group -> model -> restore.
        self.startup: dict[str, float] = {"process": time.time() - _process_age_s(),
                                          "trainer": time.time()}
        self.config = config
        self.config_digest = config.digest()
        self.step = 0
        self.last_count = 0
        """The global batch's count (tokens or samples) of the last step."""
        self.last_consumed = ""
        """`consumed` of the last step (see `consumed_fingerprints`)."""
        self.world = distributed.init(config.parallel)
        self.startup["process_group"] = time.time()
        validate(config, self.world.size)
        if self.world.device.type == "cpu":
            torch.set_num_threads(config.run.threads)
        os.makedirs(config.run.dir, exist_ok=True)
        self.home = build_run_home(config, self.world)
        self.metrics = build_metrics(config, self.world, self.home)
        self.spec = build_spec(config)
        self.dataset, vocab_size = build_dataset(config, self.spec, self.world)
        self.model, self.n_params = build_model(config, self.spec, vocab_size, self.world)
        self.optimizer = (self.spec.build_optimizer or build_optimizer)(self.model, config.optim)
        self.lr_at = self.spec.lr_at or lr_at
        self.micro_batches = data.micro_batch_count(config.data.batch_size, self.world.size,
                                                    config.data.micro_batch)
        # Only rank 0 decides when to save (the others learn it in the step's all-reduce), so
        # only rank 0 keeps the adaptive interval and the ledger.
        self.save_policy = build_save_policy(config.checkpoint, config.notices, config.steps,
                                             self.world.is_main, self.world.device)
        self.ledger = build_ledger(config, self.home)
        self.checkpoints = build_checkpointer(config, self.world, self._on_checkpoint_event)
        start_storage_check(config, self.checkpoints)
        self.data_order = DataOrder(
            {"seed": config.seed, "data.batch_size": config.data.batch_size,
             "data.seq_len": config.data.seq_len, "dataset": data.identity_of(self.dataset)},
            allow_change=config.checkpoint.allow_data_change)
        self.state = {"app": ModelOptimizerState(self.model, self.optimizer), "trainer": self,
                      POLICY_KEY: self.save_policy, DATA_ORDER_KEY: self.data_order}
        self.step_timer = build_step_timer(config.parallel, self.world.backend, self.checkpoints)
        self.startup["model"] = time.time()

    # -- Stateful: the checkpoint's "trainer" entry ----------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "config_digest": self.config_digest}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the step back; a checkpoint made with another config is loaded with a warning
        (the data order, which must not change, is `DataOrder`'s)."""
        self.step = int(state["step"])
        if state.get("config_digest") != self.config_digest:
            say(f"warning: resuming a checkpoint made with config {state.get('config_digest')}, "
                f"now {self.config_digest}")

    def _on_checkpoint_event(self, event: dict[str, Any]) -> None:
        """Rank 0, any thread: log it (the ledger follows once its segment is written), tell
        the save policy of commits."""
        self.metrics.write(event)
        if event.get("event") == Event.COMMIT:
            self.save_policy.on_commit(int(event["step"]), event.get("stall_s", 0.0),
                                       event.get("commit_s", 0.0))

    # -- the step loop ---------------------------------------------------------------------------
    def _train_step(self, step: int, batch: data.Batch, lr: float, notice: Notice | None
                    ) -> tuple[float, Save]:
        """One optimizer step. Returns the global mean loss and what all ranks agreed, in the
        same all-reduce, to do about saving this step (`SavePolicy.votes`).
        Raises ValueError when the global batch's count is 0 (the spec's loss counted nothing)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        model, device = self.model, self.world.device
        slices = data.micro_slices(len(batch.items), self.micro_batches)
        loss_sum = torch.zeros((), device=device)
        count = 0
        for i, part in enumerate(slices):
            # Every rank runs the same number of micro-batches (each is a collective). A share
            # too short for one of them repeats its first item with weight 0: it takes part in
            # the collectives and adds nothing to the gradient.
            items, weight = (batch.items[part], 1) if part.stop > part.start else \
                (batch.items[:1], 0)
            micro = _to_device(default_collate(items), device)
            if isinstance(model, FSDPModule):  # a spec's own plan may leave the root unsharded
                # Reduce-scatter once, after the last micro-batch; until then gradients add up
                # unsharded on each rank.
                model.set_requires_gradient_sync(i == len(slices) - 1)
            part_sum, part_count = self.spec.loss(model, micro)
            if weight == 0:
                part_sum, part_count = part_sum * 0, 0
            part_sum.backward()
            loss_sum += part_sum.detach().float()
            count += int(part_count)
        # float64: a count of tokens stays exact far beyond fp32's 2**24, and the sample
        # fingerprints (< 2**48) add up exactly.
        votes = self.save_policy.votes(step, notice)
        stats = torch.cat([
            loss_sum.double().view(1),
            torch.tensor([count, *votes], dtype=torch.float64, device=device),
            consumed_fingerprints(batch, self.config.data.batch_size, self.world).to(device)])
        dist.all_reduce(stats)
        total, global_count, *rest = stats.tolist()
        summed, consumed = rest[:len(votes)], rest[len(votes):]
        if global_count <= 0:
            raise ValueError(f"the spec {self.spec.name!r} counted 0 for global batch {step - 1}: "
                             "its loss must return the number it normalises by")
        # FSDP2 averaged the gradients over the world: times the world size it is the gradient
        # of the global loss sum; over the global count, that of the global mean.
        scale = self.world.size / global_count
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        if self.config.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.config.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_count = int(global_count)
        self.last_consumed = data_digest(consumed)
        return total / global_count, self.save_policy.decide(summed)

    def run(self) -> int:
        """Train from the newest commit to `steps`, save the final step, write final_model.pt
        (and `{uri}/final/model.safetensors`).
        Returns `exit_codes.OK`; a noticed node leaves from inside (`leave()`) instead."""
        cfg, world = self.config, self.world
        try:
            restored = self.checkpoints.load(self.state, optional={POLICY_KEY, DATA_ORDER_KEY})
        except StorageError:
            check_storage(world, self.checkpoints)  # its error names what is wrong with the URI
            raise
        check_storage(world, self.checkpoints)
        if self.data_order.changed:
            self.metrics.event(Event.DATA_CHANGED, step=restored, changed=self.data_order.changed)
            say(f"warning: resumed step {restored} with another data order: "
                + ", ".join(f"{k} {v['checkpoint']!r} -> {v['now']!r}"
                            for k, v in self.data_order.changed.items()))
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        self.save_policy.resume(restored, restarted=restart > 0)
        start = self.step
        self.startup["restore"] = time.time()
        marks = list(self.startup.items())
        self.metrics.event(Event.START, world_size=world.size, restored_step=restored,
                           restart=restart,
                           startup_s={name: round(t - marks[i - 1][1], 3)
                                      for i, (name, t) in enumerate(marks) if i > 0})
        if world.is_main:
            where = f"step {restored}" if restored is not None else "scratch"
            built = ", built on the meta device" if distributed.uses_meta_init(
                self.spec, cfg.parallel, world.device) else ""
            say(f"training {self.spec.name} ({self.n_params / 1e6:.1f}M params{built}) on "
                f"{world.size} {world.device.type} rank(s), {self.micro_batches} micro-batch(es) "
                f"per step, from {where} to step {cfg.steps}")
        stream = data.DataStream(
            self.dataset, batch_size=cfg.data.batch_size, seed=cfg.seed, rank=world.rank,
            world_size=world.size, start_step=start, prefetch=cfg.data.prefetch,
        )
        t_start, t_last = time.time(), time.time()
        try:
            for step in range(start + 1, cfg.steps + 1):
                notice = self.save_policy.pending_notice()
                with self.step_timer():
                    batch = next(stream)
                    lr = self.lr_at(step - 1, cfg.steps, cfg.optim)
                    loss, save = self._train_step(step, batch, lr, notice)
                now = time.time()
                step_time, t_last = now - t_last, now
                # The loss's own unit: tokens for a language model, samples for a classifier.
                tokens_per_step = self.last_count
                self.step = step
                self.save_policy.observe_step_time(step_time)
                self.metrics.write({
                    "step": step, "loss": loss, "lr": lr, "world_size": world.size,
                    "batch_digest": data.batch_digest(batch.global_ids),
                    "consumed": self.last_consumed,
                    "tokens_per_s": tokens_per_step / step_time, "step_time_s": step_time,
                    "restart": restart,
                })
                if world.is_main and (step % cfg.run.log_every == 0 or step == cfg.steps):
                    rate = (step - start) / (now - t_start)
                    say(progress_line(step, cfg.steps, loss, lr, tokens_per_step / step_time,
                                      world.size, (cfg.steps - step) / rate))
                if save is Save.NOTICE:
                    self._save_for_notice(step, notice)
                elif save is Save.DUE:
                    self.save_policy.record_save(step)
                    self.checkpoints.save(step, self.state)
                    self.save_policy.hold_for_join(step)
        finally:
            stream.close()
        self._finish()
        return exit_codes.OK

    def _save_for_notice(self, step: int, notice: Notice | None) -> None:
        """Save within the earliest notice deadline; a noticed node then leaves the job."""
        seconds = self.save_policy.agree_on_deadline(notice)
        self.metrics.event(Event.NOTICE, step=step, deadline_s=seconds,
                           source=notice.source if notice is not None else None)
        # save_within waits for a save still uploading within the same deadline: the deadline
        # is the cloud's, not ours to extend.
        self.save_policy.record_save(step)
        self.checkpoints.save_within(step, self.state, seconds)
        if notice is not None:
            self.leave()

    def leave(self) -> None:
        """Leave the job for good: stop this node's torchrun agent (so it does not rejoin the
        next rendezvous while its machine is being taken away) and exit. The other ranks' next
        collective fails at once; torchrun re-forms their world without this node."""
        self.metrics.event(Event.LEFT, step=self.step)
        self.metrics.close()
        if "TORCHELASTIC_RUN_ID" in os.environ:
            # A prefork worker's parent is the node's prefork server; it names its agent.
            os.kill(int(os.environ.get(AGENT_PID_ENV) or os.getppid()), signal.SIGTERM)
        os._exit(exit_codes.PREEMPTED)

    def _finish(self) -> None:
        """Commit the final step (blocking), write full final weights, say done."""
        cfg = self.config
        self.checkpoints.wait()
        if self.checkpoints.latest_step() != cfg.steps:
            self.checkpoints.save(cfg.steps, self.state)
            self.checkpoints.wait()
        full = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if self.world.is_main:
            path = os.path.join(cfg.run.dir, "final_model.pt")
            torch.save(full, path + ".tmp")
            os.replace(path + ".tmp", path)
            where = self._upload_final_weights(full)
            sink = self.home
            self.metrics.event(Event.DONE, step=cfg.steps, **(
                {"sink_lines": sink.added, "sink_add_s": round(sink.add_s, 6)} if sink else {}))
            if sink is not None:
                sink.flush()
            if self.ledger is not None:
                self.ledger.write()
            say(f"done: step {cfg.steps}; weights at {path}{where}")

    def _upload_final_weights(self, full: dict[str, Any]) -> str:
        """Rank 0: the final weights to `{uri}/final/model.safetensors`; returns " and URL", or
        "" when there is no home or the upload failed (with a warning: the final checkpoint
        holds the same weights, `elastic-train export` gets them)."""
        if self.home is None:
            return ""
        try:
            return " and " + self.home.store.write_final_weights(full)
        except (StorageError, OSError) as e:
            say(f"warning: final weights not uploaded ({e}); `elastic-train export` writes "
                "them from the final checkpoint")
            return ""

    def close(self) -> None:
        """Stop the save policy's threads, wait for a save in flight, close the metrics and the
        process group. Never raises for a failed save."""
        self.save_policy.close()
        self.checkpoints.close()
        self.metrics.close()
        if dist.is_initialized():
            dist.destroy_process_group()
