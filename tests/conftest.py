"""Shared fixtures: real object-storage servers on loopback and a fault-injecting proxy.

- `moto_server`, `gcs_emulator` (session): one server each per test session, on free ports,
  started only if a test asks for them.
- `s3`, `gcs` (function): a reset server with an empty bucket, the environment pointed at it
  (for subprocesses) and `storage_options` for in-process clients. Depend on them to get a clean
  store; tests that do not are not slowed down.
- `s3_proxy`, `gcs_proxy` (function): the same, but every request goes through a `FaultProxy`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# gcsfs reads this at import time; without it every call first waits 60 s for a Google API.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import pytest  # noqa: E402

from chaos.proxy import FaultProxy  # noqa: E402
from chaos.services import GcsEmulator, MotoS3Server  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # DCP warns on every single-process save/load; a world of one is a supported mode here.
    config.addinivalue_line("filterwarnings",
                            "ignore:torch.distributed is disabled, unavailable or uninitialized")


@dataclass
class ObjectStore:
    """A clean bucket on a loopback server, maybe behind a proxy."""

    protocol: str
    bucket: str
    storage_options: dict[str, Any]
    env: dict[str, str]
    proxy: FaultProxy | None = None
    server: Any = field(default=None, repr=False)

    def url(self, prefix: str = "") -> str:
        """A fresh URI under the bucket (unique unless `prefix` is given)."""
        return f"{self.protocol}://{self.bucket}/{prefix or uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoS3Server]:
    with MotoS3Server() as server:
        yield server


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[GcsEmulator]:
    with GcsEmulator() as server:
        yield server


BUCKET = "ckpt-test"


def _store(server: MotoS3Server | GcsEmulator, monkeypatch: pytest.MonkeyPatch,
           proxy: FaultProxy | None) -> ObjectStore:
    """Reset the server, point the environment at it (or at the proxy), make the bucket."""
    import fsspec
    import fsspec.config

    server.reset()
    endpoint = proxy.endpoint_url if proxy else server.endpoint_url
    env = server.env(endpoint)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    protocol = "s3" if isinstance(server, MotoS3Server) else "gs"
    if protocol == "s3":
        # fsspec read FSSPEC_S3_* into its config at import; keep it in step for this process.
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint,
                                                       "key": env["FSSPEC_S3_KEY"],
                                                       "secret": env["FSSPEC_S3_SECRET"]})
    fs_class = fsspec.get_filesystem_class(protocol)
    fs_class.clear_instance_cache()
    fs_class(**server.storage_options()).mkdir(BUCKET)
    return ObjectStore(protocol, BUCKET, server.storage_options(endpoint), env, proxy, server)


@pytest.fixture
def s3(moto_server: MotoS3Server, monkeypatch: pytest.MonkeyPatch) -> ObjectStore:
    return _store(moto_server, monkeypatch, None)


@pytest.fixture
def gcs(gcs_emulator: GcsEmulator, monkeypatch: pytest.MonkeyPatch) -> ObjectStore:
    return _store(gcs_emulator, monkeypatch, None)


@pytest.fixture
def s3_proxy(moto_server: MotoS3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[ObjectStore]:
    with FaultProxy(moto_server.endpoint_url, flavor="s3") as proxy:
        yield _store(moto_server, monkeypatch, proxy)


@pytest.fixture
def gcs_proxy(gcs_emulator: GcsEmulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[ObjectStore]:
    with FaultProxy(gcs_emulator.endpoint_url, flavor="gcs") as proxy:
        yield _store(gcs_emulator, monkeypatch, proxy)


@pytest.fixture(params=["file", "s3"])
def run_store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """A fresh run URI and its storage options: on a local disk, then on S3 (moto)."""
    if request.param == "file":
        return f"file://{tmp_path}/run", {}
    store = request.getfixturevalue("s3")
    return store.url("run"), store.storage_options
