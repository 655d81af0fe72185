"""The Trainer: composes model, data stream, optimizer and checkpoints into the step loop.

One step, on every rank: take this rank's share of global batch `s`, forward and backward with
the loss normalised by the global token count, let FSDP2 sum the gradients, clip, step, then one
small all-reduce that carries the loss and whether any node has a preemption notice.

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

import functools
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from checkpointing import CheckpointManager, ModelOptimizerState
from elastic_train import data, distributed, exit_codes
from elastic_train.config import Config, validate
from elastic_train.goodput import ledger
from elastic_train.interval import AdaptiveInterval
from elastic_train.join_requests import JoinRequests
from elastic_train.metrics import MetricsLog, progress_line, say
from elastic_train.model import GPT, config_for, num_params
from elastic_train.node.contract import AGENT_PID_ENV
from elastic_train.notices import Notice, build_watcher_from_env
from elastic_train.optim import build_optimizer, lr_at


class TrainerProgress(Stateful):
    """What the trainer itself checkpoints: the step (all the data stream needs) and the
    digest of the config that produced it."""

    def __init__(self, config_digest: str) -> None:
        self.step = 0
        self.config_digest = config_digest

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "config_digest": self.config_digest}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        if state.get("config_digest") != self.config_digest:
            say(f"warning: resuming a checkpoint made with config {state.get('config_digest')}, "
                f"now {self.config_digest}")


def _exit_on_sigterm() -> None:
    # os._exit, not sys.exit: a background upload thread must not keep the process alive, and
    # no collective may run. The checkpoint in flight has no commit marker, so it never counts.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(128 + signal.SIGTERM))


def _hang_timer(seconds: float) -> Callable[[], AbstractContextManager[object]]:
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


class Trainer:
    def __init__(self, config: Config) -> None:
        _exit_on_sigterm()
        # Where a (re)start spends its time, for the "start" event: process birth (a fork of
        # the node's prefork server, or a cold interpreter) -> process group -> model -> restore.
        self.startup: dict[str, float] = {"process": time.time() - _process_age_s(),
                                          "trainer": time.time()}
        self.config = config
        self.world = distributed.init(config.parallel)
        self.startup["process_group"] = time.time()
        validate(config, self.world.size)
        if self.world.device.type == "cpu":
            torch.set_num_threads(config.run.threads)
        os.makedirs(config.run.dir, exist_ok=True)
        self.metrics = MetricsLog(
            os.path.join(config.run.dir, "metrics.jsonl") if self.world.is_main else None
        )
        self.store = data.TokenStore(self._data_uri())

        torch.manual_seed(config.seed)  # the same full init on every rank, then sharded
        model = GPT(config_for(config.model, config.data.seq_len, self.store.vocab_size))
        self.n_params = num_params(model)
        self.model = distributed.shard(model.to(self.world.device), self.world, config.parallel)
        self.optimizer = build_optimizer(self.model, config.optim)
        self.progress = TrainerProgress(config.digest())
        self.state = {"app": ModelOptimizerState(self.model, self.optimizer),
                      "trainer": self.progress}
        ckpt = config.checkpoint
        run_uri = self.checkpoint_uri(config)
        # Rank 0 alone decides when to save (and tells the others in the step's all-reduce), so
        # only rank 0 keeps the adaptive interval and the ledger.
        self.interval = (AdaptiveInterval(ckpt.min_every, ckpt.max_every,
                                          prior_mtbi_s=ckpt.prior_mtbi_s or None)
                         if ckpt.interval == "adaptive" and self.world.is_main else None)
        self.ledger = (ledger.LedgerWriter(run_uri, self.metrics.path, extra=self._ledger_extra)
                       if self.world.is_main else None)
        if self.interval is not None:
            try:
                # The metrics say what the ledger (written at the last commit) cannot: that
                # this start is itself a restart after an interruption.
                ledger.restore_interval(self.interval, ledger.read_ledger(run_uri),
                                        self.metrics.path)
            except (OSError, ValueError) as e:
                say(f"warning: ledger at {run_uri} unreadable ({e}); adaptive interval starts "
                    "without history")
        # A node waiting to join makes torchrun restart every worker from the newest commit:
        # rank 0 saves first when the agents ask (elastic_train.node.rendezvous).
        self.join_requests = JoinRequests.from_env() if self.world.is_main else None
        self.checkpoints = CheckpointManager(
            run_uri,
            ckpt,
            config_digest=self.progress.config_digest,
            on_event=self._on_checkpoint_event,
        )
        self.last_save_step = 0
        self.notices = build_watcher_from_env()
        self.step_timer = _hang_timer(config.parallel.hang_timeout_s)
        self.startup["model"] = time.time()

    def _on_checkpoint_event(self, event: dict[str, Any]) -> None:
        """Rank 0, any thread: log it, learn the checkpoint cost, keep the ledger current."""
        self.metrics.write(event)
        if event.get("event") == "commit" and self.join_requests is not None:
            self.join_requests.on_commit(int(event["step"]))
        if event.get("event") == "commit" and self.interval is not None:
            self.interval.observe_checkpoint_cost(event.get("stall_s", 0.0),
                                                  event.get("commit_s", 0.0))
        if self.ledger is not None:
            self.ledger.on_event(event)

    def _ledger_extra(self) -> dict[str, Any]:
        return {"interval": self.interval.state_dict()} if self.interval is not None else {}

    @staticmethod
    def checkpoint_uri(config: Config) -> str:
        if config.checkpoint.uri:
            return config.checkpoint.uri
        return "file://" + os.path.abspath(os.path.join(config.run.dir, "checkpoints"))

    def _data_uri(self) -> str:
        """The configured dataset, or the embedded corpus prepared under run.dir on first use.
        Each node's first worker prepares it (identical bytes, atomic writes), then all wait."""
        uri = self.config.data.uri
        if not uri:
            uri = os.path.abspath(os.path.join(self.config.run.dir, "data"))
            if self.world.local_rank == 0 and not data.is_prepared(uri):
                data.prepare(uri)
            dist.barrier()
        return uri

    def _save_due(self, step: int) -> bool:
        """Rank 0's view: should the state after `step` be saved (final step excluded)?"""
        if step >= self.config.steps:
            return False
        if self.join_requests is not None and self.join_requests.save_now(step):
            return True
        if self.interval is not None:
            return step - self.last_save_step >= self.interval.next_interval_steps()
        every = self.config.checkpoint.every
        return every > 0 and step % every == 0

    def _agree_on_deadline(self, notice: Notice | None) -> float:
        """All ranks learn the seconds left before the earliest noticed node goes (one rare
        collective, only after a notice)."""
        left = notice.seconds_left() if notice is not None else math.inf
        t = torch.tensor([left], device=self.world.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return max(1.0, float(t.item()))  # clouds are often late: a past deadline still tries

    def _train_step(self, batch: data.Batch, lr: float, noticed: bool,
                    save_due: Callable[[], bool]) -> tuple[float, bool, bool]:
        """One optimizer step. Returns the global mean loss and what all ranks agreed on in the
        same all-reduce: whether any rank has a notice, whether rank 0 wants a save. Rank 0
        asks `save_due` just before that all-reduce, so that a save asked for during the step
        (a node waiting to join) is of this step, not of the next one."""
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
        flags = torch.tensor([float(noticed), float(self.world.is_main and save_due())],
                             device=self.world.device)
        stats = torch.cat([loss_sum.detach().float().view(1), flags])
        dist.all_reduce(stats)
        return stats[0].item() / global_tokens, stats[1].item() > 0, stats[2].item() > 0

    def run(self) -> int:
        cfg, world = self.config, self.world
        restored = self.checkpoints.load(self.state)
        start = self.progress.step if restored is not None else 0
        self.last_save_step = start
        self.startup["restore"] = time.time()
        marks = list(self.startup.items())
        self.metrics.event("start", world_size=world.size, restored_step=restored,
                           restart=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
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
                local_notice = self.notices.pending()
                with self.step_timer():
                    batch = next(stream)
                    lr = lr_at(step - 1, cfg.steps, cfg.optim)
                    loss, notice, save = self._train_step(batch, lr, local_notice is not None,
                                                          functools.partial(self._save_due, step))
                now = time.time()
                step_time, t_last = now - t_last, now
                self.progress.step = step
                if self.interval is not None:
                    self.interval.observe_step_time(step_time)
                self.metrics.write({
                    "step": step, "loss": loss, "lr": lr, "world_size": world.size,
                    "batch_digest": data.batch_digest(batch.global_ids),
                    "tokens_per_s": tokens_per_step / step_time, "step_time_s": step_time,
                    "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
                })
                if world.is_main and (step % cfg.run.log_every == 0 or step == cfg.steps):
                    rate = (step - start) / (now - t_start)
                    say(progress_line(step, cfg.steps, loss, lr, tokens_per_step / step_time,
                                      world.size, (cfg.steps - step) / rate))
                if notice:
                    self._save_for_notice(step, local_notice)
                elif save:
                    self.checkpoints.save(step, self.state)
                    self.last_save_step = step
        finally:
            stream.close()
        self._finish()
        return exit_codes.OK

    def _save_for_notice(self, step: int, notice: Notice | None) -> None:
        """Save within the earliest notice deadline; a noticed node then leaves the job."""
        seconds = self._agree_on_deadline(notice)
        self.metrics.event("notice", step=step, deadline_s=seconds,
                           source=notice.source if notice is not None else None)
        self.checkpoints.wait()
        self.checkpoints.save_within(step, self.state, seconds)
        self.last_save_step = step
        if notice is not None:
            self.leave()

    def leave(self) -> None:
        """Leave the job for good: stop this node's torchrun agent (so it does not rejoin the
        next rendezvous while its machine is being taken away) and exit. The other ranks' next
        collective fails at once; torchrun re-forms their world without this node."""
        self.metrics.event("left", step=self.progress.step)
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
            self.metrics.event("done", step=cfg.steps)
            if self.ledger is not None:
                self.ledger.write()
            say(f"done: step {cfg.steps}; weights at {path}")

    def close(self) -> None:
        self.notices.close()
        if self.join_requests is not None:
            self.join_requests.close()
        self.checkpoints.close()
        self.metrics.close()
        if dist.is_initialized():
            dist.destroy_process_group()
