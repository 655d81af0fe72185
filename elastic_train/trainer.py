"""The Trainer: composes model, data stream, optimizer and checkpoints into the step loop.

One step, on every rank: take this rank's share of global batch `s`, forward and backward with
the loss normalised by the global token count, let FSDP2 sum the gradients, clip, step, then one
small all-reduce that carries the loss and the save policy's votes (whether any node has a
preemption notice, whether rank 0 wants this step saved).

What happens on failure:
- A peer vanishes or hangs: the next collective raises (or times out after
  `parallel.collective_timeout_s`); the worker exits with `COLLECTIVE_TIMEOUT` and torchrun
  re-forms the world. Every worker then resumes from the newest committed checkpoint.
- A step exceeds `parallel.hang_timeout_s`: torchrun's file timer kills the worker (SIGKILL).
- SIGTERM (torchrun stopping the group): the worker exits at once, doing no collective work,
  so the agent never waits out its 30 s shutdown grace. An upload in flight is abandoned; it
  was never committed, so nobody will load it.
- A preemption notice on any node: all ranks agree at the next step boundary, save within the
  notice's deadline, and the noticed node leaves; the others go on in a smaller world.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from checkpointing import CheckpointManager, ModelOptimizerState
from elastic_train import data, distributed, exit_codes
from elastic_train.config import Config, validate
from elastic_train.events import Event
from elastic_train.goodput import store
from elastic_train.metrics import MetricsLog, progress_line, say
from elastic_train.model import build_model, num_params
from elastic_train.node.contract import AGENT_PID_ENV
from elastic_train.notices import Notice
from elastic_train.optim import build_optimizer, lr_at
from elastic_train.save_policy import Save, build_save_policy

POLICY_KEY = "policy"
"""The save policy's entry in a checkpoint, beside "app" (model and optimizer) and "trainer"."""


def _exit_on_sigterm() -> None:
    # os._exit, not sys.exit: a background upload thread must not keep the process alive, and
    # no collective may run. The checkpoint in flight has no commit marker, so it never counts.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(128 + signal.SIGTERM))


def build_step_timer(seconds: float) -> Callable[[], AbstractContextManager[object]]:
    """A context factory: the node's watchdog (elastic_train/node/watchdog.py, serving the FIFO at
    TORCHELASTIC_TIMER_FILE) SIGKILLs this worker if a step takes longer than `seconds` (a hung
    peer, or this process stopped). A no-op when `seconds` is 0 or no watchdog serves a FIFO.
    A watchdog that is not (or no longer) there leaves steps untimed, with one warning, rather
    than failing them: it starts alongside the node's agent, not before it."""
    path = os.environ.get("TORCHELASTIC_TIMER_FILE")
    if seconds <= 0 or not path:
        return lambda: nullcontext()
    from torch.distributed.elastic.timer import FileTimerClient

    client = FileTimerClient(path)
    warned = False

    @contextmanager
    def step_timer() -> Iterator[None]:
        nonlocal warned
        try:
            client.acquire("step", time.time() + seconds)
            armed = True
        except BrokenPipeError:
            armed = False
            if not warned:
                say(f"warning: no hang watchdog serves {path} yet; this step runs untimed")
                warned = True
        try:
            yield
        finally:
            if armed:
                with suppress(BrokenPipeError):
                    client.release("step")

    return step_timer


def _process_age_s() -> float:
    """Seconds since this process began (Linux: to the clock tick; elsewhere 0)."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def checkpoint_uri(config: Config) -> str:
    """`checkpoint.uri`, or `{run.dir}/checkpoints` when it is empty."""
    if config.checkpoint.uri:
        return config.checkpoint.uri
    return "file://" + os.path.abspath(os.path.join(config.run.dir, "checkpoints"))


def build_metrics(config: Config, world: distributed.World) -> MetricsLog:
    """metrics.jsonl under run.dir, written by rank 0; other ranks' log writes nothing."""
    return MetricsLog(os.path.join(config.run.dir, "metrics.jsonl") if world.is_main else None)


def build_token_store(config: Config, world: distributed.World) -> data.TokenStore:
    """The configured dataset, or the embedded corpus prepared under run.dir on first use.
    Each node's first worker prepares it (identical bytes, atomic writes), then all wait (a
    collective: raises as one does when a peer is gone)."""
    uri = config.data.uri
    if not uri:
        uri = os.path.abspath(os.path.join(config.run.dir, "data"))
        if world.local_rank == 0 and not data.is_prepared(uri):
            data.prepare(uri)
        dist.barrier()
    return data.TokenStore(uri)


def build_checkpointer(config: Config, on_event: Callable[[dict[str, Any]], None]
                       ) -> CheckpointManager:
    """The run's checkpoint manager (collective: build it on every rank, in the same order)."""
    return CheckpointManager(checkpoint_uri(config), config.checkpoint,
                             config_digest=config.digest(), on_event=on_event)


def build_ledger(config: Config, metrics: MetricsLog, world: distributed.World
                 ) -> store.LedgerWriter | None:
    """Rank 0 keeps ledger.json beside the checkpoints current, for goodput reports."""
    if not world.is_main or metrics.path is None:
        return None
    return store.LedgerWriter(checkpoint_uri(config), metrics.path)


def sample_fingerprint(inputs: torch.Tensor, targets: torch.Tensor) -> int:
    """A 48-bit digest of one sample's tokens as this rank holds them (its inputs and the target
    that follows them): small enough that a sum of a few stays exact in a float64."""
    tokens = torch.cat([inputs.reshape(-1), targets.reshape(-1)[-1:]]).to("cpu", torch.int64)
    return int.from_bytes(hashlib.blake2b(tokens.numpy().tobytes(), digest_size=6).digest(),
                          "little")


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
    rows = [sample_fingerprint(x, y) for x, y in zip(batch.inputs, batch.targets, strict=True)]
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
        self.last_consumed = ""
        """`consumed` of the last step (see `consumed_fingerprints`)."""
        self.world = distributed.init(config.parallel)
        self.startup["process_group"] = time.time()
        validate(config, self.world.size)
        if self.world.device.type == "cpu":
            torch.set_num_threads(config.run.threads)
        os.makedirs(config.run.dir, exist_ok=True)
        self.metrics = build_metrics(config, self.world)
        self.store = build_token_store(config, self.world)
        model = build_model(config.model, config.data.seq_len, self.store.vocab_size, config.seed)
        self.n_params = num_params(model)
        self.model = distributed.shard(model, self.world, config.parallel)
        self.optimizer = build_optimizer(self.model, config.optim)
        # Only rank 0 decides when to save (the others learn it in the step's all-reduce), so
        # only rank 0 keeps the adaptive interval and the ledger.
        self.save_policy = build_save_policy(config.checkpoint, config.steps, self.world.is_main,
                                             self.world.device)
        self.ledger = build_ledger(config, self.metrics, self.world)
        self.checkpoints = build_checkpointer(config, self._on_checkpoint_event)
        self.state = {"app": ModelOptimizerState(self.model, self.optimizer), "trainer": self,
                      POLICY_KEY: self.save_policy}
        self.step_timer = build_step_timer(config.parallel.hang_timeout_s)
        self.startup["model"] = time.time()

    # -- Stateful: the checkpoint's "trainer" entry ----------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "config_digest": self.config_digest}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the step back; a checkpoint made with another config is loaded with a warning."""
        self.step = int(state["step"])
        if state.get("config_digest") != self.config_digest:
            say(f"warning: resuming a checkpoint made with config {state.get('config_digest')}, "
                f"now {self.config_digest}")

    def _on_checkpoint_event(self, event: dict[str, Any]) -> None:
        """Rank 0, any thread: log it, tell the save policy of commits, keep the ledger current."""
        self.metrics.write(event)
        if event.get("event") == Event.COMMIT:
            self.save_policy.on_commit(int(event["step"]), event.get("stall_s", 0.0),
                                       event.get("commit_s", 0.0))
        if self.ledger is not None:
            self.ledger.on_event(event)

    # -- the step loop ---------------------------------------------------------------------------
    def _train_step(self, step: int, batch: data.Batch, lr: float, notice: Notice | None
                    ) -> tuple[float, Save]:
        """One optimizer step. Returns the global mean loss and what all ranks agreed, in the
        same all-reduce, to do about saving this step (`SavePolicy.votes`)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        inputs = batch.inputs.to(self.world.device, non_blocking=True)
        targets = batch.targets.to(self.world.device, non_blocking=True)
        logits = self.model(inputs)
        loss_sum = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.view(-1), reduction="sum"
        )
        global_tokens = self.config.data.batch_size * self.config.data.seq_len
        # Each rank's loss is its share of the global mean; FSDP2 averages gradients over the
        # world, so scaling by the world size makes that average the full-batch gradient.
        (loss_sum * (self.world.size / global_tokens)).backward()
        if self.config.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        votes = self.save_policy.votes(step, notice)
        # float64: the sample fingerprints (< 2**48) must add up exactly.
        stats = torch.zeros(1 + len(votes) + self.config.data.batch_size, dtype=torch.float64,
                            device=self.world.device)
        stats[0] = loss_sum.detach().double()
        stats[1:1 + len(votes)] = torch.tensor(votes, dtype=torch.float64)
        stats[1 + len(votes):] = consumed_fingerprints(batch, self.config.data.batch_size,
                                                       self.world)
        dist.all_reduce(stats)
        loss, *rest = stats.tolist()
        summed, consumed = rest[:len(votes)], rest[len(votes):]
        self.last_consumed = data_digest(consumed)
        return loss / global_tokens, self.save_policy.decide(summed)

    def run(self) -> int:
        """Train from the newest commit to `steps`, save the final step, write final_model.pt.
        Returns `exit_codes.OK`; a noticed node leaves from inside (`leave()`) instead."""
        cfg, world = self.config, self.world
        restored = self.checkpoints.load(self.state, optional={POLICY_KEY})
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
            say(f"training {cfg.model} ({self.n_params / 1e6:.1f}M params) on {world.size} "
                f"{world.device.type} rank(s) from {where} to step {cfg.steps}")
        stream = data.DataStream(
            self.store, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
            seed=cfg.seed, rank=world.rank, world_size=world.size, start_step=start,
            prefetch=cfg.data.prefetch,
        )
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        t_start, t_last = time.time(), time.time()
        try:
            for step in range(start + 1, cfg.steps + 1):
                notice = self.save_policy.pending_notice()
                with self.step_timer():
                    batch = next(stream)
                    lr = lr_at(step - 1, cfg.steps, cfg.optim)
                    loss, save = self._train_step(step, batch, lr, notice)
                now = time.time()
                step_time, t_last = now - t_last, now
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
        finally:
            stream.close()
        self._finish()
        return exit_codes.OK

    def _save_for_notice(self, step: int, notice: Notice | None) -> None:
        """Save within the earliest notice deadline; a noticed node then leaves the job."""
        seconds = self.save_policy.agree_on_deadline(notice)
        self.metrics.event(Event.NOTICE, step=step, deadline_s=seconds,
                           source=notice.source if notice is not None else None)
        self.checkpoints.wait()
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
            self.metrics.event(Event.DONE, step=cfg.steps)
            if self.ledger is not None:
                self.ledger.write()
            say(f"done: step {cfg.steps}; weights at {path}")

    def close(self) -> None:
        """Stop the save policy's threads, wait for a save in flight, close the metrics and the
        process group. Never raises for a failed save."""
        self.save_policy.close()
        self.checkpoints.close()
        self.metrics.close()
        if dist.is_initialized():
            dist.destroy_process_group()
