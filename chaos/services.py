"""Real object-storage servers on loopback, for tests, benchmarks and the local cluster.

`MotoS3Server` runs moto's standalone S3 server and `GcsEmulator` gcp-storage-emulator, each as a
subprocess from this virtualenv on a free loopback port. Both are context managers; `stop()` is
idempotent, also runs at interpreter exit, and kills the server's whole process group, so no server
outlives its owner (short of the owner itself being SIGKILLed).
"""

from __future__ import annotations

import atexit
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

DUMMY_KEY = "testing-key"
DUMMY_SECRET = "testing-secret"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_bin(name: str) -> str:
    """The console script `name` beside this interpreter (the venv's bin), else from PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


class _ServerProcess:
    """A server subprocess in its own session, ready once `probe_path` answers over HTTP.

    Raises RuntimeError (with the server's log tail) if it exits or does not answer within
    `start_timeout_s`; the process is killed before raising.
    """

    name = "server"
    probe_path = "/"
    start_timeout_s = 30.0

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> _ServerProcess:
        if self._proc is not None:
            return self
        last_error = ""
        for _ in range(3):  # a port picked by free_port() may be taken before the server binds it
            self.port = free_port()
            self._log = tempfile.TemporaryFile(prefix=f"{self.name}-")
            self._proc = subprocess.Popen(self.command(self.port), stdout=self._log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
            atexit.register(self.stop)
            try:
                self._wait_ready()
                return self
            except RuntimeError as e:
                last_error = str(e)
                self.stop()
        raise RuntimeError(last_error)

    def _wait_ready(self) -> None:
        assert self._proc is not None
        end = time.monotonic() + self.start_timeout_s
        while time.monotonic() < end:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self._proc.returncode}: "
                                   f"{self.log_tail()}")
            try:
                self.request("GET", self.probe_path, timeout=2.0)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not answer on {self.endpoint_url} within "
                           f"{self.start_timeout_s:.0f} s: {self.log_tail()}")

    def request(self, method: str, path: str, body: bytes | None = None,
                timeout: float = 10.0) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def log_tail(self, limit: int = 2000) -> str:
        if self._log is None:
            return ""
        try:
            self._log.seek(0)
            return self._log.read().decode(errors="replace")[-limit:]
        except (OSError, ValueError):
            return ""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stop(self) -> None:
        """Terminate the server and everything it started; idempotent, never raises."""
        proc, self._proc = self._proc, None
        if proc is not None:
            for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    break
                try:
                    proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
            try:
                proc.wait(1.0)
            except subprocess.TimeoutExpired:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None
        atexit.unregister(self.stop)

    def __enter__(self) -> _ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MotoS3Server(_ServerProcess):
    """moto's S3 API server. Data lives in its memory: `reset()` wipes every bucket."""

    name = "moto_server"
    probe_path = "/moto-api/"

    def command(self, port: int) -> list[str]:
        return [venv_bin("moto_server"), "-H", self.host, "-p", str(port)]

    def reset(self) -> None:
        status, body = self.request("POST", "/moto-api/reset")
        if status != 200:
            raise RuntimeError(f"moto reset answered {status}: {body[:200]!r}")

    def env(self, endpoint_url: str | None = None) -> dict[str, str]:
        """Environment for s3fs/botocore clients (dummy credentials). `endpoint_url` overrides
        the server's own, e.g. to go through a fault-injecting proxy."""
        return {
            "FSSPEC_S3_ENDPOINT_URL": endpoint_url or self.endpoint_url,
            "FSSPEC_S3_KEY": DUMMY_KEY,
            "FSSPEC_S3_SECRET": DUMMY_SECRET,
            "AWS_ACCESS_KEY_ID": DUMMY_KEY,
            "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def storage_options(self, endpoint_url: str | None = None) -> dict[str, object]:
        """The same as `env()`, as s3fs storage options (for in-process clients)."""
        return {"endpoint_url": endpoint_url or self.endpoint_url, "key": DUMMY_KEY,
                "secret": DUMMY_SECRET}


class GcsEmulator(_ServerProcess):
    """gcp-storage-emulator, in memory. Clients need `token="anon"` and, set before gcsfs is
    imported, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (else every call waits 60 s)."""

    name = "gcp-storage-emulator"
    probe_path = "/storage/v1/b"

    def command(self, port: int) -> list[str]:
        return [venv_bin("gcp-storage-emulator"), "start", f"--host={self.host}",
                f"--port={port}", "--in-memory"]

    def reset(self) -> None:
        """Delete every bucket and object (the emulator's wipe endpoint)."""
        status, body = self.request("GET", "/wipe")
        if status not in (200, 204):
            raise RuntimeError(f"gcs emulator wipe answered {status}: {body[:200]!r}")

    def env(self, endpoint_url: str | None = None) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": endpoint_url or self.endpoint_url,
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    def storage_options(self, endpoint_url: str | None = None) -> dict[str, object]:
        return {"endpoint_url": endpoint_url or self.endpoint_url, "token": "anon"}
