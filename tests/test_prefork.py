"""The prefork server: a worker forked from it behaves, for whoever started the client, like the
process it stands for (stdio, environment, directory, exit code, signals), and no child outlives
its client or the server. `elastic_train.node.worker`, what torchrun starts on our nodes, hands
the trainer's command to the server, or runs the trainer itself when no server answers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from elastic_train import exit_codes
from elastic_train.node import prefork
from elastic_train.node.worker import TRAINER_ENTRY, WORKER_ENTRY

TARGET = textwrap.dedent("""
    import os, signal, sys, time
    mode = sys.argv[1]
    print("warm", "json" in sys.modules and "email.mime.text" in sys.modules, "cwd", os.getcwd(),
          "mark", os.environ.get("MARK"), "socket", os.environ.get("ELASTIC_TRAIN_PREFORK"),
          "agent", os.environ.get("ELASTIC_TRAIN_AGENT_PID"), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if mode == "exit":
        sys.exit(int(sys.argv[2]))
    if mode == "sleep":
        signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", flush=True), os._exit(43)))
        print("ready", os.getpid(), flush=True)
        # Short sleeps: a handler runs between bytecodes, and one long sleep would sleep through
        # a signal that lands after "ready" is written but before the sleep begins.
        for _ in range(12000):
            time.sleep(0.05)
    if mode == "raise":
        raise ValueError("boom")
""")
CLIENT = ("import sys; from elastic_train.node import prefork; "
          "code = prefork.run_through_server(sys.argv[1], sys.argv[2:]); "
          "print('no server', flush=True) if code is None else prefork.exit_like(code)")


def _start_server(path: str, preload: str) -> subprocess.Popen[str]:
    """`python -m elastic_train.node.prefork`: it forks the server as an agent does, then waits."""
    proc = subprocess.Popen([sys.executable, "-m", "elastic_train.node.prefork", "--socket", path,
                             "--preload", preload], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "LISTENING"
    return proc


@pytest.fixture
def server() -> Iterator[str]:
    # A short path: unix socket paths are limited to 108 bytes.
    path = f"/tmp/et-test-{os.getpid()}-{time.monotonic_ns()}.sock"
    # email.mime.text stands in for torch: imported once in the server, present in every child.
    proc = _start_server(path, "email.mime.text")
    yield path
    proc.terminate()
    proc.wait(10)
    prefork.remove(path)


def _client(path: str, tmp_path: Path, *args: str, **kw: object) -> subprocess.Popen[str]:
    script = tmp_path / "target.py"
    script.write_text(TARGET)
    return subprocess.Popen([sys.executable, "-c", CLIENT, path, str(script), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MARK": "m1", prefork.PREFORK_SOCKET_ENV: path},
                            cwd=tmp_path, **kw)


def test_a_forked_worker_takes_the_clients_stdio_env_dir_and_exit_code(server: str,
                                                                       tmp_path: Path) -> None:
    client = _client(server, tmp_path, "exit", "7")
    out, err = client.communicate(timeout=60)
    assert client.returncode == 7, err
    assert f"warm True cwd {tmp_path} mark m1 socket None agent {os.getpid()}" in out
    assert "to stderr" in err


def test_an_uncaught_exception_exits_1_with_its_traceback(server: str, tmp_path: Path) -> None:
    client = _client(server, tmp_path, "raise")
    _, err = client.communicate(timeout=60)
    assert client.returncode == 1 and "ValueError: boom" in err


def _ready_child(client: subprocess.Popen[str]) -> int:
    assert client.stdout is not None
    for line in client.stdout:
        if line.startswith("ready"):
            return int(line.split()[1])
    raise AssertionError("the worker never started")


def test_signals_reach_the_worker_and_its_death_is_the_clients(server: str,
                                                               tmp_path: Path) -> None:
    client = _client(server, tmp_path, "sleep")
    child = _ready_child(client)
    assert child != client.pid and prefork.trainer_pid(server, client.pid) == child
    client.send_signal(signal.SIGTERM)
    out, _ = client.communicate(timeout=30)
    assert client.returncode == 43 and "got SIGTERM" in out

    client = _client(server, tmp_path, "sleep")
    child = _ready_child(client)
    os.kill(child, signal.SIGKILL)  # e.g. the node's hang watchdog
    client.wait(30)
    assert client.returncode == -signal.SIGKILL


def test_a_client_killed_with_its_reply_unread_takes_its_worker_not_the_server(
        server: str, tmp_path: Path) -> None:
    # torchrun may kill a worker as soon as it starts, before it has read its child's pid: the
    # connection then resets instead of closing.
    script = tmp_path / "target.py"
    script.write_text(TARGET)
    request = {"command": [str(script), "sleep"], "env": dict(os.environ), "cwd": str(tmp_path),
               "agent_pid": os.getpid()}
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock, \
            open(os.devnull, "r+b") as null:
        sock.connect(server)
        socket.send_fds(sock, [json.dumps(request).encode()], [null.fileno()] * 3)
        child = psutil.Process(json.loads(sock.recv(4096, socket.MSG_PEEK))["pid"])
    child.wait(10)
    client = _client(server, tmp_path, "exit", "7")  # and the server still serves
    client.communicate(timeout=60)
    assert client.returncode == 7


def test_a_killed_client_takes_its_worker_along(server: str, tmp_path: Path) -> None:
    client = _client(server, tmp_path, "sleep")
    child = psutil.Process(_ready_child(client))
    client.kill()  # what torchrun does to a worker that ignores SIGTERM
    child.wait(10)


def test_when_the_agent_dies_its_server_takes_its_workers_along(tmp_path: Path) -> None:
    path = f"/tmp/et-test-{os.getpid()}-dead.sock"
    proc = _start_server(path, "json")  # proc stands for the agent that forked the server
    try:
        client = _client(path, tmp_path, "sleep")
        child = psutil.Process(_ready_child(client))
        proc.kill()
        child.wait(10)
        client.wait(10)
        assert client.returncode != 0
    finally:
        proc.kill()
        proc.wait()
        prefork.remove(path)


def test_the_server_says_when_its_imports_are_done_even_when_they_failed(tmp_path: Path) -> None:
    for preload, serves in (("email.mime.text", True), ("no.such.module", False)):
        path = f"/tmp/et-test-{os.getpid()}-{preload}.sock"
        proc = _start_server(path, preload)
        try:
            deadline = time.monotonic() + 60
            while not prefork.preloaded(path):  # a joining node's agent waits for this
                assert time.monotonic() < deadline, f"{preload}: never marked preloaded"
                time.sleep(0.02)
            if not serves:  # the failed server is gone: its clients start cold
                assert proc.wait(30) != 0
        finally:
            proc.kill()
            proc.wait()
            prefork.remove(path)
        assert not prefork.preloaded(path)


def test_without_a_server_the_client_says_so_and_runs_cold(tmp_path: Path) -> None:
    client = _client(str(tmp_path / "nobody.sock"), tmp_path, "exit", "0")
    out, _ = client.communicate(timeout=60)
    assert client.returncode == 0 and out.strip() == "no server"


def test_the_server_preloads_the_storage_the_command_names_and_no_other() -> None:
    train = list(WORKER_ENTRY)
    assert "s3fs" in prefork.preload_for([*train, "--checkpoint.uri=s3://bucket/runs/a"])
    assert "gcsfs" in prefork.preload_for([*train, "--data.uri=gs://bucket/corpus"])
    local = prefork.preload_for([*train, "--checkpoint.uri=file:///tmp/runs/a"])
    assert local[0] == "elastic_train.trainer" and not {"s3fs", "gcsfs"} & set(local)


def _worker(socket_path: str, tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """`python -m elastic_train.node.worker ARGS`, as torchrun starts a rank on our nodes."""
    return subprocess.Popen([sys.executable, *WORKER_ENTRY, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, prefork.PREFORK_SOCKET_ENV: socket_path},
                            cwd=tmp_path)


def test_a_rank_hands_the_trainers_command_to_the_server_and_exits_as_it_did(
        tmp_path: Path) -> None:
    """A stand-in server: it records the request, says it forked a child, and reports exit 7."""
    path = f"/tmp/et-test-{os.getpid()}-{time.monotonic_ns()}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(60)
    child = subprocess.Popen(["sleep", "60"])  # stands for the forked trainer
    try:
        worker = _worker(path, tmp_path, "--steps=3", "--model=tiny")
        conn, _ = listener.accept()
        message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        for fd in fds:
            os.close(fd)
        request = json.loads(message)
        conn.send(json.dumps({"pid": child.pid}).encode())
        conn.send(json.dumps({"exit": 7}).encode())
        worker.communicate(timeout=60)
        conn.close()
    finally:
        child.kill()
        child.wait()
        listener.close()
        prefork.remove(path)
    assert request["command"] == [*TRAINER_ENTRY, "--steps=3", "--model=tiny"]
    assert request["cwd"] == str(tmp_path)
    assert worker.returncode == 7


def test_a_rank_without_a_server_runs_the_trainer_itself(tmp_path: Path) -> None:
    worker = _worker(str(tmp_path / "nobody.sock"), tmp_path, f"--run.dir={tmp_path}", "--stepz=3")
    _, err = worker.communicate(timeout=60)
    assert worker.returncode == exit_codes.BAD_CONFIG
    assert err.strip() == "elastic-train: error: unknown config key 'stepz' (did you mean 'steps'?)"
