"""Warm workers: a per-node server that imports torch and the trainer once, then forks a ready
worker for every rank torchrun starts. A re-formed world trains again a fraction of a second after
its rendezvous instead of after the seconds a fresh interpreter spends importing them (figures in
docs/benchmarks.md).

    elastic_train.node.prefork.fork_server(PATH)    # in the node's agent, before it starts

torchrun starts `python -m elastic_train.node.worker ...` for each rank. With ELASTIC_TRAIN_PREFORK
set to the socket, that process (the *client*, which never imports torch) hands the server the
trainer's command (`-m elastic_train.train ...`), its environment, working directory and stdio;
the server forks a child that runs the trainer exactly as the client would have. For torchrun the
client stays the worker: it passes SIGTERM, SIGINT, SIGHUP and SIGUSR1 on to the child (one that
comes before the child exists, once it does) and exits with the child's status (a death by signal
is reproduced as one). The server stays single-threaded, so forking it is safe. In `ps` a forked
worker shows its agent's command line; `trainer_pid` maps a torchrun worker to its trainer.

What happens on failure:
- no server, or it is gone: the client runs the trainer itself (a cold start; nothing else
  differs).
- the client dies (SIGKILLed by its agent, or with its node): the server SIGKILLs the child at
  once, as a torchrun worker would die.
- the server dies: each client SIGKILLs its child and exits 1, and torchrun restarts them (cold).
- the server's parent dies: the server kills its children and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import runpy
import select
import shutil
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from elastic_train.node.contract import AGENT_PID_ENV, PREFORK_SOCKET_ENV
from elastic_train.node.procs import signal_quietly
from elastic_train.startup import gc_paused

PRELOAD = ("elastic_train.trainer", "torch._dynamo", "torch.profiler",
           "fsspec.implementations.local")
"""Imported once by the server; only the first must import. torch._dynamo is imported lazily by
FSDP2's first `fully_shard`, which every worker calls, so it is here too."""
STORAGE_PRELOAD = {"s3://": "s3fs", "s3a://": "s3fs", "gs://": "gcsfs", "gcs://": "gcsfs"}
"""The fsspec implementation to preload when the command names a URL with this scheme. Only
those: on a node that comes back, the server's imports are what its first worker waits for, and
s3fs and gcsfs are slow to import. A URL only in a config file is imported by the worker."""
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
_MAX_REQUEST = 1 << 20


# ------------------------------------------------------------------------------------ client


def run_through_server(path: str, command: Sequence[str]) -> int | None:
    """Run `python COMMAND` (`-m module args...` or `script.py args...`) in a child of the
    prefork server at `path`, with this process's stdio, environment and directory; return its
    exit code (negative: killed by that signal), or None when there is no server to ask (the
    caller then runs it itself)."""
    # A signal that comes before the child exists is held, and passed on once it does: the
    # trainer, not this stand-in, decides what a SIGTERM means (a notice save, say).
    held = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    request = {"command": list(command), "env": dict(os.environ), "cwd": os.getcwd(),
               "agent_pid": os.getppid()}
    try:
        sock.connect(path)
        socket.send_fds(sock, [json.dumps(request).encode()], [0, 1, 2])
        reply = sock.recv(4096)
    except OSError:
        reply = b""
    pid_file = _pid_file(path, os.getpid())
    if not reply:  # no server, or it went away before forking: the caller starts cold
        sock.close()
        with contextlib.suppress(OSError):
            pid_file.write_text(str(os.getpid()))
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        return None
    child = int(json.loads(reply)["pid"])
    with contextlib.suppress(OSError):
        pid_file.write_text(str(child))
    for sig in FORWARDED:
        signal.signal(sig, lambda s, _f: signal_quietly(child, s))
    try:
        reply = _recv_passing_signals_on(sock, held)
    finally:
        pid_file.unlink(missing_ok=True)
    if not reply:  # the server died, and the child's status with it
        signal_quietly(child, signal.SIGKILL)
        return 1
    return int(json.loads(reply)["exit"])


def _recv_passing_signals_on(sock: socket.socket, mask: set[signal.Signals]) -> bytes:
    """`sock.recv()` with the signal mask set back to `mask` while it waits, so that the held
    signals and any later ones reach their handlers. A Python handler runs only between
    bytecodes, and a signal that lands after the last check but before a blocking call begins
    would wait for that call to end (here: the child's exit, which it was meant to cause).
    The wake-up fd turns every signal into a readable byte, so the wait ends and the handler
    runs."""
    wake_r, wake_w = socket.socketpair()
    wake_w.setblocking(False)
    previous = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        while sock not in select.select([sock, wake_r], [], [])[0]:
            wake_r.recv(64)
        return sock.recv(4096)
    except OSError:
        return b""
    finally:
        signal.set_wakeup_fd(previous)
        wake_r.close()
        wake_w.close()


def run_as_main(command: Sequence[str]) -> None:
    """Run `python COMMAND` (`-m module args...` or `script.py args...`) in this process, as the
    interpreter would: `sys.argv` set, the module or script run as `__main__`. Whatever it raises
    propagates, SystemExit (its exit code) included."""
    command = [str(a) for a in command]
    if command[0] == "-m":
        sys.argv = [command[1], *command[2:]]
        runpy.run_module(command[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = command
        runpy.run_path(command[0], run_name="__main__")


def exit_like(code: int) -> None:
    """Leave this process the way the child did: same exit code, or death by the same signal."""
    if code < 0:
        with contextlib.suppress(OSError, ValueError):  # SIGKILL has no handler to reset
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


def trainer_pid(path: str, client_pid: int) -> int | None:
    """The pid of the process that runs the trainer for client `client_pid` (a torchrun worker)
    of the server at `path`: its forked child, the client itself when it started cold, or None
    while it waits for the server."""
    try:
        return int(_pid_file(path, client_pid).read_text())
    except (OSError, ValueError):
        return None


def preloaded(path: str) -> bool:
    """Whether the server at `path` is done with its imports: a worker now starts in the time a
    fork takes (or cold, if they failed)."""
    return _preloaded_file(path).exists()


def _preloaded_file(path: str) -> Path:
    return Path(f"{path}.pids") / "preloaded"  # beside the pid files, named by number


def remove(path: str) -> None:
    """Remove a (dead) server's socket and pid files."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    shutil.rmtree(f"{path}.pids", ignore_errors=True)


def _pid_file(path: str, client_pid: int) -> Path:
    return Path(f"{path}.pids") / str(client_pid)


# ------------------------------------------------------------------------------------ server


class PreforkServer:
    """Accepts clients on a unix socket and forks one trainer per client. See the module
    docstring for what happens when a client, the server or its parent dies."""

    def __init__(self, path: str) -> None:
        self.path = path
        Path(f"{path}.pids").mkdir(mode=0o700, parents=True, exist_ok=True)
        _preloaded_file(path).unlink(missing_ok=True)  # a dead server's, at the same path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        # Bound before the imports: a client that connects meanwhile waits in the backlog.
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(path)
        os.chmod(path, 0o600)  # clients send their environment, credentials included
        self.listener.listen(64)
        self.children: dict[int, socket.socket] = {}
        self._stopping = False

    def preload(self, modules: Sequence[str] = PRELOAD) -> None:
        """Import `modules`, then mark the server preloaded (`preloaded`), also when the first
        one failed to import (the server then exits, and its clients start cold)."""
        try:
            with gc_paused():
                for name in modules:
                    try:
                        importlib.import_module(name)
                    except ImportError:
                        if name == modules[0]:
                            raise
                # Once here, not in every worker: the scan of the installed specs, and an S3
                # client's service data.
                from checkpointing import storage
                from elastic_train import spec

                spec.registered()
                storage.prepare_sessions()
        finally:
            with contextlib.suppress(OSError):
                _preloaded_file(self.path).touch()

    def serve(self) -> None:
        """Until SIGTERM/SIGINT, or this process's parent dies. Kills its children on the way
        out."""
        parent = os.getppid()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: setattr(self, "_stopping", True))
        try:
            while not self._stopping and os.getppid() == parent:
                clients = {conn: pid for pid, conn in self.children.items()}
                ready, _, _ = select.select([self.listener, *clients], [], [], 0.05)
                for sock in ready:
                    if sock is self.listener:
                        self._accept()
                    elif not _recv_or_empty(sock):  # the client is gone: its worker goes too
                        signal_quietly(clients[sock], signal.SIGKILL)
                self._reap()
        finally:
            for pid in self.children:
                signal_quietly(pid, signal.SIGKILL)
            while self.children:
                self._reap(block=True)
            self.listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        # The socket file is 0600, but its mode is one chmod (or a root-owned directory's
        # mistake) from letting another user run code with our credentials: the kernel's word
        # on who connected decides. A refused client gets no reply and starts cold, as its own
        # user.
        uid = peer_uid(conn)
        if uid != os.getuid():
            print(f"prefork: refused a client of uid {uid} (serving uid {os.getuid()} only)",
                  file=sys.stderr, flush=True)
            conn.close()
            return
        try:
            message, fds, _, _ = socket.recv_fds(conn, _MAX_REQUEST, 3)
            request = json.loads(message)
        except (OSError, ValueError):
            conn.close()
            return
        # Until the child has dropped this server's handlers, a signal its client passes on would
        # run them (and be lost): held, it reaches the child once the child's own are in place.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        pid = os.fork()
        if pid == 0:
            self.listener.close()
            for other in self.children.values():
                other.close()
            conn.close()
            _become_worker(request, fds, held)  # never returns
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        for fd in fds:
            os.close(fd)
        try:
            conn.send(json.dumps({"pid": pid}).encode())
        except OSError:
            signal_quietly(pid, signal.SIGKILL)
        self.children[pid] = conn

    def _reap(self, block: bool = False) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.send(json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode())
                conn.close()
            if block:
                return


def _recv_or_empty(conn: socket.socket) -> bytes:
    """What a client sent, or b"" once it is gone: a client that dies with our reply unread
    resets the connection instead of closing it."""
    try:
        return conn.recv(16)
    except OSError:
        return b""


def peer_uid(conn: socket.socket) -> int:
    """The user id of the process at the other end of a connected unix socket (SO_PEERCRED)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def _become_worker(request: Mapping[str, Any], fds: Sequence[int],
                   mask: set[signal.Signals]) -> None:
    """In the forked child: take over the client's stdio, environment and directory, set the
    signal mask back to `mask`, run its command as `python` would, and exit with its code."""
    code = 1
    try:
        os.setsid()  # as torchrun starts its workers: a session of its own
        for sig in (*FORWARDED, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=True)
        os.chdir(str(request["cwd"]))
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in request["env"].items()})
        # The command runs here: nothing it starts may hand itself to the server again.
        os.environ.pop(PREFORK_SOCKET_ENV, None)
        os.environ[AGENT_PID_ENV] = str(request["agent_pid"])
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and "torch" in sys.modules:  # torch read it in the server
            sys.modules["torch"].set_num_threads(int(threads))
        run_as_main(request["command"])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def preload_for(command: Sequence[str]) -> tuple[str, ...]:
    """PRELOAD plus the storage implementations that the URLs in `command` need."""
    storage = {module for arg in command for scheme, module in STORAGE_PRELOAD.items()
               if scheme in arg}
    return (*PRELOAD, *sorted(storage))


def fork_server(path: str, preload: Sequence[str] = PRELOAD) -> int:
    """Bind `path` and fork the server from this process, which imports `preload` and serves;
    return its pid. The node's agent calls this once it has imported torch and before it starts
    any thread: the server shares that import, does the rest of its own while the agent
    rendezvous, and dies with the agent (see `PreforkServer.serve`). A client that connects
    before the imports are done waits for them."""
    server = PreforkServer(path)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            server.preload(preload)
            server.serve()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    server.listener.close()
    return pid


def main(argv: list[str] | None = None) -> int:
    """A server on its own (the agent normally forks it, see `fork_server`): it serves until
    this process is stopped."""
    parser = argparse.ArgumentParser(prog="python -m elastic_train.node.prefork",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="unix socket path to serve on")
    parser.add_argument("--preload", nargs="*", default=list(PRELOAD),
                        help="modules to import once (the first one must import)")
    args = parser.parse_args(argv)
    server = fork_server(args.socket, args.preload)
    print("LISTENING", flush=True)
    _, status = os.waitpid(server, 0)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
