"""One narrow interface over an fsspec URL: read, write, list and delete objects under a root.

Every operation is whole and idempotent (a full object read, a full object write, a listing, a
delete), so `retry.retrying` can repeat it after a transient fault without leaving half a result.
Endpoints and credentials come from fsspec's own configuration (`FSSPEC_S3_ENDPOINT_URL`,
`STORAGE_EMULATOR_HOST`, `AWS_*`, ...) and from `storage_options`; neither is ever logged or put
in a message: errors pass through `redact` first.
"""

from __future__ import annotations

import base64
import json
import os
import posixpath
import re
import sys
import threading
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

from checkpointing.errors import CheckpointError, StorageError
from checkpointing.retry import retrying

SECRET_OPTION_KEYS = ("key", "secret", "token", "password", "session_token",
                      "aws_access_key_id", "aws_secret_access_key", "aws_session_token")
"""storage_options keys (at any depth) whose values are credentials."""

CLIENT_RETRIES = {"s3": 1, "gs": 2, "gcs": 2}
"""Attempts the fsspec client itself makes per call (botocore adds its own 2 for s3)."""

SECRET_ENV_PREFIXES = ("AWS_", "FSSPEC_S3_", "FSSPEC_GS_", "FSSPEC_GCS_", "GOOGLE_",
                       "GCSFS_", "CLOUDSDK_")
"""Environment variables fsspec, botocore and google-auth read. Every value of theirs that could
be a credential (not a plain word such as a region or a number) is redacted."""
_PUBLIC_ENV_VALUE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$|^\d+$|^(true|false|anon)$",
                               re.IGNORECASE)
"""Values safe to leave in messages: regions (`us-east-1`), numbers, flags."""


SCHEMES = ("s3", "gs", "gcs", "file")
EXPECTED_URI = "expected s3://bucket/prefix, gs://bucket/prefix, file:///path or a plain path"
_SCHEME_LIKE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*):")
_SLASHES_NO_COLON = re.compile(r"^(s3|gs|gcs|file)/+", re.IGNORECASE)


def check_uri(url: str, what: str = "URI") -> None:
    """Raise ValueError, in one line naming `url` and what is expected, unless it is an
    `s3://`, `gs://` or `file://` URL or a plain path that does not look like a mistyped URL
    (`s3:/bucket`, `s3//bucket`, `gs:bucket` would otherwise be local directories)."""
    if not url.strip():
        raise ValueError(f"{what} is empty; {EXPECTED_URI}")
    if "://" in url:
        scheme, rest = url.split("://", 1)
        if scheme.lower() not in SCHEMES:
            raise ValueError(f"{what} {url!r} has an unsupported scheme {scheme!r}; "
                             f"{EXPECTED_URI}")
        if scheme.lower() != "file" and not rest.split("/", 1)[0]:
            raise ValueError(f"{what} {url!r} names no bucket; {EXPECTED_URI}")
        return
    if _SCHEME_LIKE.match(url) or _SLASHES_NO_COLON.match(url):
        raise ValueError(f"{what} {url!r} looks like a mistyped URI; {EXPECTED_URI}")


def normalize_url(url: str | os.PathLike[str]) -> str:
    """`s3://b/p/` -> `s3://b/p`; a plain path -> `file:///abs/path`. Raises ValueError (one line,
    see `check_uri`) if it is empty or not a URI we can write to."""
    url = os.fspath(url).strip()
    check_uri(url, "checkpoint URI")
    if "://" not in url:
        return "file://" + os.path.abspath(os.path.expanduser(url))
    protocol, rest = url.split("://", 1)
    protocol = protocol.lower()
    if protocol == "file":
        return "file://" + os.path.abspath(rest)
    if protocol == "gcs":
        protocol = "gs"
    return f"{protocol}://{rest.rstrip('/')}"


def default_storage_options(protocol: str, user: Mapping[str, Any]) -> dict[str, Any]:
    """Options for fsspec with our retry defaults; the user's keys win.

    botocore's legacy retry mode makes 5 attempts and s3fs retries again on top, so the layers
    multiply: one delayed call becomes a storm of requests. We keep botocore to a few attempts in
    "standard" mode and let one tenacity layer around whole operations bound the total time.
    """
    options = dict(user)
    if protocol == "s3":
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", {"mode": "standard", "max_attempts": 2})
        config.setdefault("connect_timeout", 10)
        config.setdefault("read_timeout", 30)
        options["config_kwargs"] = config
    if protocol in ("gs", "gcs") and os.environ.get("STORAGE_EMULATOR_HOST"):
        options.setdefault("token", "anon")
    return options


def secret_values(storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Every credential string we might be holding: from options (at any depth) and the env."""
    found: list[str] = []

    def walk(value: Any, key: str = "") -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, str(k).lower())
        elif isinstance(value, str) and key in SECRET_OPTION_KEYS and len(value) >= 4:
            found.append(value)

    walk(storage_options or {})
    found += [value for name, value in os.environ.items()
              if name.upper().startswith(SECRET_ENV_PREFIXES) and len(value) >= 4
              and not _PUBLIC_ENV_VALUE.match(value)]
    return found


_FILESYSTEMS: dict[tuple[Any, ...], AbstractFileSystem] = {}
_FILESYSTEMS_LOCK = threading.Lock()
_PREPARED_SESSIONS: dict[str, Any] = {}
"""protocol -> a client session with its service data loaded (`prepare_sessions`)."""
_PREPARED_ENV: dict[str, str] = {}
"""The AWS_* variables when the sessions were prepared: a session reads its profile and config
files once, so a process whose AWS_* differ (a worker sent another environment) makes its own."""
_SESSION_OPTIONS = frozenset({"session", "profile", "session_vars", "event_hooks"})
"""s3 storage_options that make s3fs build a session of its own: a prepared one would drop them."""


def prepare_sessions() -> None:
    """Load what every S3 client is made from (botocore's service model, endpoint rules and
    partitions, which each new session parses again; docs/benchmarks.md, "Start-up costs") into
    one session that later filesystems of this process and of its forks take (`_filesystem`).
    The node's prefork server calls this before it forks workers, so that a worker's first
    request does not pay for it at every (re)start.

    Resolves no credentials (the throwaway client it makes is given placeholders; each
    filesystem still resolves its own, in the process that uses it), sends no request, and leaves
    no thread or event loop behind, so the process can still fork. Does nothing unless s3fs is
    imported. Never raises: on failure, first requests are only slower."""
    if "s3fs" not in sys.modules or "s3" in _PREPARED_SESSIONS:
        return
    try:
        import asyncio

        from aiobotocore.session import AioSession

        session = AioSession()

        async def make_client() -> None:
            async with session.create_client("s3", region_name="us-east-1",
                                             aws_access_key_id="prepare",
                                             aws_secret_access_key="prepare"):
                pass

        asyncio.run(make_client())
    except Exception:  # noqa: BLE001 - an optimisation: its failure must not stop a node
        return
    _PREPARED_SESSIONS["s3"] = session
    _PREPARED_ENV.clear()
    _PREPARED_ENV.update(_aws_env())


def _aws_env() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name.startswith("AWS_")}


def _filesystem(protocol: str, options: Mapping[str, Any]) -> AbstractFileSystem:
    """The process's fsspec filesystem for `protocol` and `options` under the current fsspec
    configuration (endpoints and credentials from the environment), made on first use.

    Shared because a client costs 0.1-0.3 s of CPU to make (a session, the service's model,
    credentials) and a worker opens several Storages (data, checkpoints, metrics, ledger) at
    every start. Not fsspec's own instance cache: we change the retry count of ours. A forked
    child makes its own (an instance's event loop does not survive a fork), from the session its
    parent prepared if there is one (`prepare_sessions`)."""
    config = {name: value for name, value in os.environ.items()
              if name.upper().startswith(SECRET_ENV_PREFIXES) or name == "STORAGE_EMULATOR_HOST"}
    key = (os.getpid(), protocol, json.dumps(options, sort_keys=True, default=repr),
           json.dumps(fsspec.config.conf.get(protocol), sort_keys=True, default=repr),
           tuple(sorted(config.items())))
    with _FILESYSTEMS_LOCK:
        fs = _FILESYSTEMS.get(key)
        if fs is None:
            prepared = _PREPARED_SESSIONS.get(protocol)
            extra = {"session": prepared} if prepared is not None \
                and not _SESSION_OPTIONS & set(options) and _aws_env() == _PREPARED_ENV else {}
            fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options, **extra)
            if protocol in CLIENT_RETRIES:
                # s3fs retries SlowDown/network errors 5 times around botocore's own attempts,
                # gcsfs 6 times: layers that multiply. `retrying` is the layer that counts.
                fs.retries = CLIENT_RETRIES[protocol]
            _FILESYSTEMS[key] = fs
        return fs


def redact(text: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """`text` with every known credential replaced by `***`."""
    for secret in sorted(secret_values(storage_options), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


class Storage:
    """Objects under one root URL. Paths given to methods are relative to the root.

    Every method retries transient faults for at most `retry_timeout_s` in total, then raises
    `StorageError` (credentials redacted). `write_bytes` is atomic for readers: on object stores a
    single PUT is; on a local disk we write a temporary file, fsync it and rename it.
    """

    def __init__(self, url: str | os.PathLike[str],
                 storage_options: Mapping[str, Any] | None = None,
                 retry_timeout_s: float = 60.0) -> None:
        self.url = normalize_url(url)
        self.protocol = self.url.split("://", 1)[0]
        self._user_options = dict(storage_options or {})
        self.storage_options = default_storage_options(self.protocol, self._user_options)
        self.retry_timeout_s = retry_timeout_s
        try:
            self.fs: AbstractFileSystem = _filesystem(self.protocol, self.storage_options)
        except (ImportError, ValueError, TypeError) as e:
            raise StorageError(f"cannot open storage {self.url!r}: {self.redact(str(e))}") from e
        self.root: str = self.fs._strip_protocol(self.url).rstrip("/") or "/"
        self.is_local = self.protocol == "file"

    # -- paths ---------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """The filesystem path (no protocol) of `parts` under the root."""
        return posixpath.join(self.root, *[p.strip("/") for p in parts if p])

    def child(self, *parts: str) -> Storage:
        """A Storage rooted at `parts` under this root, sharing its options and filesystem."""
        new = object.__new__(Storage)
        new.__dict__.update(self.__dict__)
        new.root = self.path(*parts)
        new.url = f"{self.protocol}://{new.root}" if self.protocol != "file" else \
            f"file://{new.root}"
        return new

    def redact(self, text: str) -> str:
        return redact(text, self._user_options)

    def _retry(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return retrying(self.retry_timeout_s, what)(fn)(*args, **kwargs)
        except (FileNotFoundError, FileExistsError, CheckpointError):
            raise
        except Exception as e:  # noqa: BLE001 - every storage failure becomes one clear type
            raise StorageError(f"{what} failed: {self.redact(f'{type(e).__name__}: {e}')}") from e

    # -- operations ----------------------------------------------------------------------
    def read_bytes(self, rel: str, start: int | None = None, end: int | None = None) -> bytes:
        """The object's bytes [start, end). Raises FileNotFoundError if it does not exist."""
        path = self.path(rel)

        def read() -> bytes:
            data = self.fs.cat_file(path, start=start, end=end)
            want = None if start is None or end is None else end - start
            if want is not None and len(data) != want:
                # A truncated body that the HTTP layer did not notice: retry the whole range.
                raise ConnectionError(f"short read of {rel}: {len(data)} of {want} bytes")
            return data

        return self._retry(f"read {self._show(rel)}", read)

    def write_bytes(self, rel: str, data: bytes | memoryview, crc32: int | None = None) -> None:
        """Replace the object with `data`, atomically for readers.

        `crc32`, the CRC-32 of `data` if the caller has it: S3 then checks the body against it
        and refuses a damaged upload (retried), and botocore does not compute it again (one
        pass over the bytes fewer)."""
        path = self.path(rel)
        if self.is_local:
            self._retry(f"write {self._show(rel)}", _write_local_atomic, path, data)
            return
        checksum = {}
        if crc32 is not None and self.protocol == "s3":
            checksum["ChecksumCRC32"] = base64.b64encode(crc32.to_bytes(4, "big")).decode()
        self._retry(f"write {self._show(rel)}", self.fs.pipe_file, path, bytes(data), **checksum)

    def create_exclusive(self, rel: str, data: bytes) -> None:
        """Write the object only if it does not exist yet (atomic where the store allows: a
        hard link on local disks, `If-None-Match: *` on S3, `ifGenerationMatch=0` on GCS).
        Raises FileExistsError if it exists. A retry after a lost reply may find our own write:
        callers compare the contents to tell."""
        path = self.path(rel)
        if self.is_local:
            self._retry(f"create {self._show(rel)}", _write_local_atomic, path, data,
                        exclusive=True)
        else:
            self._retry(f"create {self._show(rel)}", self.fs.pipe_file, path, data,
                        mode="create")

    def probe(self) -> None:
        """Write, read back and delete a small object under the root: fails before any training
        if the bucket is missing, the credentials are missing or the write is denied. Raises
        StorageError naming the URL (and the cause, redacted); a missing bucket or directory that
        the store cannot create raises it too."""
        # One name per probe at the root: two writers probing at once (a relaunch overlapping
        # the old job's teardown) must not remove each other's directory mid-probe.
        rel = f"_probe-{uuid.uuid4().hex}"
        body = b"elastic-train storage probe"
        try:
            self.write_bytes(rel, body)
            if self.read_bytes(rel) != body:
                raise StorageError(f"{self.url}: a probe object read back different bytes")
            self.remove([rel])
        except FileNotFoundError as e:
            raise StorageError(f"{self.url}: not writable (no such bucket or directory: "
                               f"{self.redact(str(e))})") from None

    def list_files(self, rel: str = "") -> dict[str, int]:
        """{name relative to `rel`: size} of every file below `rel`; {} if there is none."""
        base = self.path(rel)

        def listing() -> dict[str, int]:
            self.fs.invalidate_cache(base)
            try:
                found = self.fs.find(base, detail=True)
            except FileNotFoundError:
                return {}
            return {posixpath.relpath(p, base): int(info.get("size") or 0)
                    for p, info in found.items() if info.get("type", "file") != "directory"}

        return self._retry(f"list {self._show(rel)}", listing)

    def list_dirs(self, rel: str = "") -> list[str]:
        """Names of the entries directly below `rel` (objects and prefixes)."""
        base = self.path(rel)

        def listing() -> list[str]:
            self.fs.invalidate_cache(base)
            try:
                entries = self.fs.ls(base, detail=False)
            except FileNotFoundError:
                return []
            return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

        return self._retry(f"list {self._show(rel)}", listing)

    def exists(self, rel: str) -> bool:
        path = self.path(rel)

        def check() -> bool:
            self.fs.invalidate_cache(posixpath.dirname(path))
            return bool(self.fs.exists(path))

        return self._retry(f"stat {self._show(rel)}", check)

    def remove(self, rels: Iterable[str]) -> list[str]:
        """Delete these objects (missing ones are fine); returns their full URLs. On an object
        store, in one request per thousand (S3's DeleteObjects, GCS's batch), retried whole."""
        rels = list(rels)
        if not rels:
            return []
        paths = [self.path(rel) for rel in rels]
        shown = self._show(rels[0]) + (f" and {len(rels) - 1} more" if len(rels) > 1 else "")

        def rm() -> None:
            if self.is_local:
                for path in paths:
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
                return
            try:
                self.fs.rm(paths)
            except FileNotFoundError:
                pass

        self._retry(f"delete {shown}", rm)
        return [self.url_of(rel) for rel in rels]

    def remove_tree(self, rel: str) -> list[str]:
        """Delete every object below `rel`; returns their URLs. Local empty dirs go too."""
        names = self.list_files(rel)
        removed = self.remove(posixpath.join(rel, n) for n in sorted(names))
        if self.is_local:
            import shutil

            shutil.rmtree(self.path(rel), ignore_errors=True)
        return removed

    def url_of(self, rel: str = "") -> str:
        return f"{self.protocol}://{self.path(rel)}" if self.protocol != "file" else \
            f"file://{self.path(rel)}"

    def _show(self, rel: str) -> str:
        return self.url_of(rel)


def _write_local_atomic(path: str, data: bytes | memoryview, exclusive: bool = False) -> None:
    """Write `path` so that a reader sees the old file or the whole new one, never a torn one
    (`exclusive`: only if there is no old one; FileExistsError otherwise)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    # The rename is durable only once the directory entry is.
    dir_fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
