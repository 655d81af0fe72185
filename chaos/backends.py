"""Where a chaos run's checkpoints and data live: a folder under --out, or a local S3 / GCS server.

`open_backend(storage, ...)` is a context manager yielding a `Backend`: the checkpoint URI, the
prepared-data URI, the environment the trainer needs to reach the storage, and (object stores
only) `outage(seconds)`, which makes every storage call fail for that long through the fault
proxy between the trainer and the server. Servers and proxy run on loopback and are stopped on
exit, even when the body raised.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA_DIR = "data/embedded"
"""Under the harness cache: the embedded corpus, prepared once and shared by every run."""


@dataclass
class Backend:
    storage: str
    checkpoint_uri: str
    data_uri: str
    env: dict[str, str] = field(default_factory=dict)
    outage: Callable[[float], None] | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)
    """Server and proxy processes (checked by no_orphans after the backend closed)."""


def prepared_data(cache: Path) -> str:
    """The embedded corpus prepared under `cache` (once; later calls reuse it)."""
    from elastic_train import data

    uri = str((cache / DATA_DIR).resolve())
    if not data.is_prepared(uri):
        tmp = f"{uri}.tmp-{uuid.uuid4().hex[:6]}"
        data.prepare(tmp)
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, uri)
        except OSError:  # another run prepared it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    return uri


@contextlib.contextmanager
def open_backend(storage: str, out: Path, cache: Path) -> Iterator[Backend]:
    """Yield the Backend for `storage` ("file", "s3" or "gcs").

    file: checkpoints under `{out}/checkpoints` (kept after the run), data from the cache.
    s3 / gcs: a fresh bucket on a loopback server behind the fault proxy; the embedded corpus is
    prepared into it, so the trainer reads data and writes checkpoints through the proxy.
    Raises whatever the server raises when it cannot start."""
    if storage == "file":
        ckpt = out / "checkpoints"
        ckpt.mkdir(parents=True, exist_ok=True)
        yield Backend("file", "file://" + str(ckpt.resolve()), prepared_data(cache))
        return
    with contextlib.ExitStack() as stack:
        yield _object_store(storage, stack)


def _object_store(storage: str, stack: contextlib.ExitStack) -> Backend:
    from chaos import proxy, services

    bucket = f"chaos-{uuid.uuid4().hex[:8]}"
    server: services.MotoS3Server | services.GcsEmulator
    if storage == "s3":
        server = stack.enter_context(services.MotoS3Server())
        scheme = "s3"
    else:
        server = stack.enter_context(services.GcsEmulator())
        scheme = "gs"
    fault_proxy = stack.enter_context(proxy.FaultProxy(server.endpoint_url, flavor=storage))
    env = server.env(fault_proxy.endpoint_url)
    if storage == "gcs":
        env["FSSPEC_GS_TOKEN"] = "anon"  # fsspec's env config: gcsfs clients that get no options
    backend = Backend(storage, f"{scheme}://{bucket}/checkpoints", f"{scheme}://{bucket}/data",
                      env=env, outage=fault_proxy.outage)
    backend.pids = [server.pid] if server.pid else []
    # The harness reads checkpoints straight from the server, never through the proxy.
    backend.storage_options = server.storage_options()
    with environ(env):
        import fsspec

        fs = fsspec.filesystem(scheme, skip_instance_cache=True, **server.storage_options())
        fs.mkdir(bucket)
    # In a child process: fsspec reads its FSSPEC_* configuration when it is imported.
    subprocess.run(
        [sys.executable, "-c", "import sys; from elastic_train import data; "
         "data.prepare(sys.argv[1])", backend.data_uri],
        env={**os.environ, **env}, check=True, capture_output=True, timeout=120)
    return backend


@contextlib.contextmanager
def environ(env: dict[str, str]) -> Iterator[None]:
    """Set `env` in os.environ for the block, then restore what was there."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
