"""Finding and killing a node's processes: through the process tree, and through a tag in their
environment for those that left it.

torchrun starts every worker in a session of its own, and a forked worker is a child of the
prefork server, not of the agent. So when an agent dies its workers are re-parented and train on,
holding the node's devices, and killing the agent's process group would not reach them. Whoever
starts an agent therefore sets a tag in its environment (`NAME=value`), which every process the
agent starts inherits; `tagged` finds them wherever they ended up.

psutil is imported on first use: the prefork client imports this module and must start fast.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psutil

KILL_WAIT_S = 10.0
"""How long `kill` and `kill_tree` wait for SIGKILLed processes to be gone before they return."""


def signal_quietly(pid: int, sig: int) -> bool:
    """Send `sig` to `pid`; False (and nothing raised) when no such process exists."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def signal_tree(pid: int, sig: int) -> list[psutil.Process]:
    """Send `sig` to `pid` and every process it started, parent first; return them. SIGSTOP
    freezes a node the way a reclaimed VM looks to its peers: sockets open, heartbeats stopped,
    nothing sent. A process that vanished meanwhile is skipped; no such `pid`: an empty list."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for proc in tree:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            continue
    return tree


def freeze(root_pid: int | None, tags: Mapping[str, str], sig: int = signal.SIGSTOP) -> set[int]:
    """Stop `root_pid` first (so that it starts nothing new), then every process carrying `tags`,
    in two passes (a process forked while the first ran is stopped by the second): a node frozen
    the way a reclaimed VM looks to its peers, sockets open and silent. Returns the pids
    signalled; a process gone meanwhile is skipped, never an error. Check the effect with
    `not_stopped`."""
    frozen: set[int] = set()
    for _ in range(2):
        found = [root_pid] if root_pid is not None else []
        found += [p.pid for p in tagged(tags) if p.pid not in found]
        for pid in found:
            if pid not in frozen and signal_quietly(pid, sig):
                frozen.add(pid)
    return frozen


def not_stopped(pids: Iterable[int], timeout_s: float) -> set[int]:
    """Those of `pids` still alive and not stopped after up to `timeout_s` (polled)."""
    import psutil

    pids = set(pids)
    deadline = time.monotonic() + timeout_s
    while True:
        running = set()
        for pid in pids:
            try:
                if psutil.Process(pid).status() not in (psutil.STATUS_STOPPED,
                                                        psutil.STATUS_ZOMBIE):
                    running.add(pid)
            except psutil.NoSuchProcess:
                continue
        if not running or time.monotonic() >= deadline:
            return running
        time.sleep(0.02)


def tagged(tags: Mapping[str, str]) -> list[psutil.Process]:
    """Every live process but this one whose environment carries every `NAME=value` of `tags`.

    Zombies are left out (they hold nothing and cannot be killed), and so are processes whose
    environment this user may not read or that vanished meanwhile. Raises ValueError when `tags`
    is empty: that would match every process of the machine."""
    import psutil

    if not tags:
        raise ValueError("tagged() needs at least one NAME=value to match")
    me = os.getpid()
    found = []
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            env = proc.environ()
            if all(env.get(name) == value for name, value in tags.items()) and \
                    proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def kill(procs: Iterable[psutil.Process], timeout_s: float = KILL_WAIT_S) -> list[psutil.Process]:
    """SIGKILL each of `procs` and wait up to `timeout_s` for all of them to be gone; return those
    still alive then (normally none). A process already gone is skipped, never an error."""
    import psutil

    procs = list(procs)
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    return alive


def kill_tree(root: subprocess.Popen[Any], tags: Mapping[str, str],
              timeout_s: float = KILL_WAIT_S) -> set[int]:
    """SIGKILL `root` and every process it started, the way a reclaimed machine's processes vanish.

    `root` goes first, so that it starts nothing new; then its descendants; then every process
    carrying `tags` (see `tagged`), which catches those that left the tree when their parent died.
    `root` is reaped through its Popen, so its exit status stays readable there. Returns the pids
    killed besides `root`. Safe to call again, and on a tree that is already gone."""
    import psutil

    descendants = []
    if root.poll() is None:  # once reaped, its pid may be another process's already
        try:
            descendants = psutil.Process(root.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    root.kill()
    kill(descendants, timeout_s)
    root.wait()
    stragglers = tagged(tags)
    kill(stragglers, timeout_s)
    return {p.pid for p in (*descendants, *stragglers)}
