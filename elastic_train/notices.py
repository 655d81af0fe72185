"""Preemption notices: learn that this node is about to be taken away, without blocking training.

A `NoticeWatcher` polls a set of sources from one daemon thread and keeps the most urgent notice
it has seen; the step loop calls `pending()` (a read of one attribute, never I/O) at each step
boundary. Sources:

- `aws`: EC2 IMDSv2 `GET /latest/meta-data/spot/instance-action` (404 until a notice, then JSON
  `{"action": "terminate"|"stop"|"hibernate", "time": "2026-01-01T00:00:00Z"}`, two minutes ahead),
  with a session token from `PUT /latest/api/token`.
- `gcp`: `GET /computeMetadata/v1/instance/preempted` with `Metadata-Flavor: Google`: `FALSE`,
  then `TRUE` once preemption has begun (about 30 s before the VM stops; no time is given).
- `azure`: Scheduled Events `GET /metadata/scheduledevents?api-version=2020-07-01` with
  `Metadata: true`: an event with `EventType` `Preempt` (at least 30 s ahead; `NotBefore` is the
  time). Acknowledging it would only make the eviction come sooner, so we never do.
- `skypilot`: SkyPilot 0.14.1 has lifecycle hooks (task YAML `config.hooks`, events `stop`,
  `preemption`, `down`; see sky/skylet/hook_executor.py and sky/utils/schemas.py `_HOOKS_SCHEMA`).
  The `preemption` event fires only on Kubernetes, where skylet's SIGTERM handler claims it
  (sky/skylet/skylet.py `_sigterm_handler`, `_should_install_preemption_sigterm_handler`): on
  AWS/GCP/Azure VMs 0.14.1 fires no preemption hook at all (its docstring defers that to a
  metadata poller that this version does not contain), so on VMs the cloud sources above are the
  notice. The source reads the claim file that skylet writes before running preemption hooks
  (`~/.sky/hooks/.teardown_claim` containing `preemption`); a hook that runs
  `touch $ELASTIC_TRAIN_NOTICE_FILE` reaches the `file` source as well.
- `file`: the file named by `ELASTIC_TRAIN_NOTICE_FILE` exists. Its content may be empty or JSON
  `{"deadline": unix_time, "detail": "..."}`. A level, not an edge: whoever writes it removes it
  before the node is reused. Write it atomically (rename) or the deadline may be read late.
- `signal`: SIGUSR1 to the worker, for manual use (`kill -USR1 PID`).

Failure semantics: no source ever raises into the caller. A cloud source that has never answered
is taken to be absent after one answer that is not that cloud's metadata server's (a 4xx, a
missing `Metadata-Flavor`), or after `absent_after` failures in a row (connection refused or
timed out, HTTP 5xx): it is logged once at INFO and never polled again, so off-cloud it costs at
most `absent_after` short timeouts. A source that has answered once is never dropped; later
failures are transient and logged at DEBUG. A read timeout after a connection was made never
counts towards absence (Azure's first Scheduled Events call may take minutes while the service
starts). Notices are sticky: once seen, `pending()` keeps returning one until the watcher is
closed.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import json
import logging
import os
import signal
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from elastic_train.config import NoticesConfig
from elastic_train.node.contract import NOTICE_FILE_ENV

log = logging.getLogger(__name__)

# Documented warning times, used only when a source gives no deadline of its own.
GRACE_S = {"aws": 120.0, "gcp": 30.0, "azure": 30.0}
SOURCE_NAMES = ("aws", "gcp", "azure", "skypilot", "file", "signal")
DEFAULT_SOURCES = ("file", "signal", "skypilot")

# Link-local metadata addresses. GCP documents 169.254.169.254 as equivalent to
# metadata.google.internal; the IP avoids a DNS lookup that can hang for seconds off-cloud.
AWS_BASE_URL = "http://169.254.169.254"
GCP_BASE_URL = "http://169.254.169.254"
AZURE_BASE_URL = "http://169.254.169.254"
SKYPILOT_CLAIM_FILE = "~/.sky/hooks/.teardown_claim"


@dataclass(frozen=True)
class Notice:
    """This node will be taken away: `deadline` is unix time if the source says when, else None."""

    source: str
    deadline: float | None
    detail: str
    received: float

    def seconds_left(self, default_s: float | None = None, now: float | None = None) -> float:
        """Seconds until the node goes away: from `deadline`, else `received + default_s`, where
        `default_s` defaults to the source's documented warning time (30 s when unknown)."""
        now = time.time() if now is None else now
        if self.deadline is not None:
            return self.deadline - now
        grace = default_s if default_s is not None else GRACE_S.get(self.source, 30.0)
        return self.received + grace - now


class SourceAbsent(Exception):
    """The endpoint answered, but it is not this source's (another cloud, or none)."""


class NoticeSource(Protocol):
    """One place a notice can come from. `poll` returns a notice or None; it may raise OSError
    (transient, or absence if it never answered), `SourceAbsent`, or `_ReadTimeout`."""

    name: str
    is_remote: bool

    def poll(self) -> Notice | None: ...


class _ReadTimeout(Exception):
    """Connected, but the answer did not come in time: the server is there, just slow."""


@dataclass
class _Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def _request(method: str, url: str, headers: dict[str, str], timeout_s: float) -> _Response:
    """One HTTP request with `timeout_s` for the connect and for the answer. Raises OSError when
    no connection could be made, `_ReadTimeout` when one was made but the answer was late."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=timeout_s)
    try:
        conn.connect()  # OSError here: nothing listens (or no route): evidence of absence
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
            return _Response(resp.status, resp.headers, resp.read(65536))
        except TimeoutError as e:  # socket.timeout is TimeoutError since 3.10
            raise _ReadTimeout(str(e) or "read timed out") from None
    finally:
        conn.close()


def _parse_time(text: str) -> float | None:
    """ISO 8601 (AWS) or RFC 1123 (Azure) to unix time; None if it is neither."""
    text = text.strip()
    if not text:
        return None
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    with contextlib.suppress(TypeError, ValueError):
        return email.utils.parsedate_to_datetime(text).timestamp()
    return None


class AwsSource:
    """EC2 spot instance-action via IMDSv2. Falls back to IMDSv1 (no token) when the token PUT
    times out, which is what a container behind an IMDS hop limit of 1 sees. Raises SourceAbsent
    when the token endpoint answers with anything but a token (another cloud's server)."""

    name = "aws"
    is_remote = True
    TOKEN_TTL_S = 21600

    def __init__(self, base_url: str = AWS_BASE_URL, timeout_s: float = 0.3,
                 clock: Callable[[], float] = time.time) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.clock = clock
        self._token: str | None = None
        self._token_expires = 0.0
        self._v1 = False

    def _headers(self) -> dict[str, str]:
        if self._v1:
            return {}
        if self._token is None or self.clock() >= self._token_expires:
            try:
                r = _request("PUT", f"{self.base_url}/latest/api/token",
                             {"X-aws-ec2-metadata-token-ttl-seconds": str(self.TOKEN_TTL_S)},
                             self.timeout_s)
            except _ReadTimeout:
                self._v1 = True  # hop limit: the PUT's answer never arrives; try IMDSv1
                return {}
            if r.status >= 500:
                raise OSError(f"token endpoint: HTTP {r.status}")
            if r.status != 200 or not r.body:
                raise SourceAbsent(f"token endpoint answered HTTP {r.status}")
            self._token = r.body.decode().strip()
            self._token_expires = self.clock() + self.TOKEN_TTL_S - 60
        return {"X-aws-ec2-metadata-token": self._token}

    def poll(self) -> Notice | None:
        r = _request("GET", f"{self.base_url}/latest/meta-data/spot/instance-action",
                     self._headers(), self.timeout_s)
        if r.status == 401:
            if self._v1:
                self._v1 = False  # try for a token again next time
                raise SourceAbsent("IMDSv2 required but its token cannot be had (hop limit?)")
            self._token = None  # expired or revoked: fetch a new one next time
            raise OSError("IMDS token rejected")
        if r.status == 404:
            if self._v1:
                # Without a token a 404 does not prove this is EC2: check that IMDS is there.
                probe = _request("GET", f"{self.base_url}/latest/meta-data/instance-id", {},
                                 self.timeout_s)
                if probe.status != 200:
                    raise SourceAbsent(f"no IMDSv1 (instance-id: HTTP {probe.status})")
            return None
        if r.status != 200:
            raise OSError(f"instance-action: HTTP {r.status}")
        try:
            doc = json.loads(r.body)
            action, when = str(doc["action"]), _parse_time(str(doc.get("time", "")))
        except (ValueError, KeyError, TypeError):
            return Notice(self.name, None, f"unparsed instance-action {r.body[:200]!r}",
                          self.clock())
        return Notice(self.name, when, f"spot instance-action {action}", self.clock())


class GcpSource:
    """GCE `instance/preempted`. Raises SourceAbsent when the server does not answer as Google's
    metadata server does (the `Metadata-Flavor: Google` response header)."""

    name = "gcp"
    is_remote = True

    def __init__(self, base_url: str = GCP_BASE_URL, timeout_s: float = 0.3,
                 clock: Callable[[], float] = time.time) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.clock = clock

    def poll(self) -> Notice | None:
        # A plain poll, not ?wait_for_change=true: a hanging request would hold the one poll
        # thread, and a 1 s poll is ample against a 30 s warning.
        r = _request("GET", f"{self.base_url}/computeMetadata/v1/instance/preempted",
                     {"Metadata-Flavor": "Google"}, self.timeout_s)
        if r.status >= 500:
            raise OSError(f"preempted: HTTP {r.status}")
        if r.headers.get("Metadata-Flavor") != "Google" or r.status == 404:
            raise SourceAbsent(f"not a GCE metadata server (HTTP {r.status})")
        if r.status != 200:
            raise OSError(f"preempted: HTTP {r.status}")
        if r.body.strip().upper() == b"TRUE":
            return Notice(self.name, None, "GCE instance preempted", self.clock())
        return None


class AzureSource:
    """Azure Scheduled Events, `Preempt` only (Reboot/Redeploy/Freeze do not take the node).
    Only events whose `Resources` name this VM count when the VM name is known (`vm_name`, or
    the instance metadata's compute name, asked once). Raises SourceAbsent when the endpoint
    answers without a Scheduled Events document."""

    name = "azure"
    is_remote = True
    API_VERSION = "2020-07-01"

    def __init__(self, base_url: str = AZURE_BASE_URL, timeout_s: float = 0.5,
                 vm_name: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.vm_name = vm_name
        self._asked_name = vm_name is not None
        self.clock = clock

    def _ask_vm_name(self) -> None:
        self._asked_name = True
        try:
            r = _request("GET", f"{self.base_url}/metadata/instance/compute/name"
                         "?api-version=2021-02-01&format=text", {"Metadata": "true"},
                         self.timeout_s)
        except (OSError, _ReadTimeout):
            return
        if r.status == 200 and r.body.strip():
            self.vm_name = r.body.decode().strip()

    def poll(self) -> Notice | None:
        r = _request("GET", f"{self.base_url}/metadata/scheduledevents"
                     f"?api-version={self.API_VERSION}", {"Metadata": "true"}, self.timeout_s)
        if r.status >= 500:  # the service may still be starting (first call after boot)
            raise OSError(f"scheduledevents: HTTP {r.status}")
        try:
            doc = json.loads(r.body) if r.status == 200 else None
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("Events"), list):
            raise SourceAbsent(f"no Scheduled Events document (HTTP {r.status})")
        if not self._asked_name:
            self._ask_vm_name()
        best: Notice | None = None
        for ev in doc["Events"]:
            if not isinstance(ev, dict) or ev.get("EventType") != "Preempt":
                continue
            resources = ev.get("Resources") or []
            if self.vm_name and resources and self.vm_name not in resources:
                continue  # another VM of the same scale set or availability set
            when = _parse_time(str(ev.get("NotBefore", "")))
            notice = Notice(self.name, when, f"Scheduled Event Preempt {ev.get('EventId', '')}",
                            self.clock())
            if best is None or (when is not None and (best.deadline or float("inf")) > when):
                best = notice
        return best


class FileSource:
    """The file at `path` exists. Never absent; a read error is reported as a notice without a
    deadline (the file's existence is the notice)."""

    name = "file"
    is_remote = False

    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock

    def poll(self) -> Notice | None:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(65536)
        except FileNotFoundError:
            return None
        except OSError as e:
            return Notice(self.name, None, f"{self.path} (unreadable: {e})", self.clock())
        deadline, detail = None, self.path
        if raw.strip():
            try:
                doc = json.loads(raw)
                if doc.get("deadline") is not None:
                    deadline = float(doc["deadline"])
                if doc.get("detail"):
                    detail = f"{self.path}: {doc['detail']}"
            except (ValueError, TypeError, AttributeError):
                detail = f"{self.path} (content is not JSON with a numeric deadline)"
        return Notice(self.name, deadline, detail, self.clock())


class SkyPilotSource(FileSource):
    """SkyPilot's per-node teardown claim says `preemption` (Kubernetes only in 0.14.1)."""

    name = "skypilot"

    def __init__(self, claim_file: str = SKYPILOT_CLAIM_FILE,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(os.path.expanduser(claim_file), clock)

    def poll(self) -> Notice | None:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                claim = f.read(64).strip()
        except OSError:
            return None
        if claim != "preemption":
            return None  # stop/down: a planned teardown, not a preemption
        return Notice(self.name, None, f"SkyPilot preemption hook claimed ({self.path})",
                      self.clock())


class SignalSource:
    """A signal (default SIGUSR1) was received. `install()` must be called from the main thread
    (Python's rule for signal handlers); it raises ValueError elsewhere. `uninstall()` puts the
    previous handler back."""

    name = "signal"
    is_remote = False

    def __init__(self, signum: int = signal.SIGUSR1, clock: Callable[[], float] = time.time
                 ) -> None:
        self.signum = signum
        self.clock = clock
        self._received: float | None = None
        self._previous: object = None
        self._installed = False
        self.on_signal: Callable[[], None] | None = None

    def install(self) -> None:
        self._previous = signal.signal(self.signum, self._handle)
        self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(self.signum, self._previous)  # type: ignore[arg-type]
            self._installed = False

    def _handle(self, signum: int, frame: object) -> None:
        # Runs in the main thread between bytecodes: only set fields, take no lock we may hold.
        if self._received is None:
            self._received = self.clock()
        if self.on_signal is not None:
            self.on_signal()

    def poll(self) -> Notice | None:
        if self._received is None:
            return None
        name = signal.Signals(self.signum).name
        return Notice(self.name, None, f"{name} received", self._received)


def _more_urgent(a: Notice, b: Notice | None) -> bool:
    """Whether `a` should replace `b`: a known deadline beats none; earlier beats later."""
    if b is None:
        return True
    if a.deadline is not None and b.deadline is not None:
        return a.deadline < b.deadline
    if (a.deadline is None) != (b.deadline is None):
        return a.deadline is not None
    return a.received < b.received


class NoticeWatcher:
    """Polls `sources` every `interval_s` seconds from one daemon thread.

    `pending()` never blocks and never raises. `start()` begins polling (and installs a
    `SignalSource`'s handler, so call it from the main thread); `close()` stops the thread within
    one request timeout and restores signal handlers; both are safe to call twice. Usable as a
    context manager.
    """

    def __init__(self, sources: Sequence[NoticeSource], interval_s: float = 1.0,
                 absent_after: int = 3) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s={interval_s} must be > 0")
        self.interval_s = interval_s
        self.absent_after = absent_after
        self._sources = list(sources)
        self._answered: set[str] = set()
        self._failures: dict[str, int] = {}
        self._absent: list[str] = []
        self._notices: dict[str, Notice] = {}
        self._pending: Notice | None = None  # replaced whole: readers need no lock
        self._lock = threading.Lock()
        self._fired = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def sources(self) -> list[str]:
        """Names of the sources still polled."""
        return [s.name for s in self._sources]

    @property
    def absent(self) -> list[str]:
        """Names of the sources given up on as absent."""
        return list(self._absent)

    def start(self) -> NoticeWatcher:
        if self._thread is not None:
            return self
        for s in self._sources:
            if isinstance(s, SignalSource):
                s.on_signal = self._wake.set
                s.install()
        self._thread = threading.Thread(target=self._run, name="notice-watcher", daemon=True)
        self._thread.start()
        return self

    def pending(self) -> Notice | None:
        """The most urgent notice seen so far, or None. Cheap: call it at every step."""
        return self._pending

    def wait(self, timeout_s: float | None = None) -> Notice | None:
        """Block until a notice is seen or `timeout_s` passes; returns `pending()`."""
        self._fired.wait(timeout_s)
        return self._pending

    def poll_once(self) -> Notice | None:
        """Poll every active source once, in the calling thread; returns `pending()`."""
        for source in list(self._sources):
            self._poll(source)
        return self._pending

    def close(self) -> None:
        for s in self._sources:
            if isinstance(s, SignalSource):
                s.uninstall()  # before touching _wake, so the handler cannot run mid-set
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def __enter__(self) -> NoticeWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def _poll(self, source: NoticeSource) -> None:
        try:
            notice = source.poll()
        except SourceAbsent as e:
            self._give_up(source, str(e), definite=True)
            return
        except _ReadTimeout as e:
            log.debug("notice source %s: %s", source.name, e)
            return
        except (OSError, http.client.HTTPException) as e:
            self._give_up(source, str(e) or type(e).__name__, definite=False)
            return
        except Exception:  # a bug in a source must not kill the watcher
            log.exception("notice source %s failed", source.name)
            return
        self._answered.add(source.name)
        self._failures.pop(source.name, None)
        if notice is not None:
            self._record(notice)

    def _give_up(self, source: NoticeSource, why: str, definite: bool) -> None:
        if source.name in self._answered:
            log.debug("notice source %s: transient failure: %s", source.name, why)
            return
        n = self._failures.get(source.name, 0) + 1
        self._failures[source.name] = n
        if definite or n >= self.absent_after:
            log.info("notice source %s is absent here (%s); not polling it again", source.name, why)
            self._sources.remove(source)
            self._absent.append(source.name)

    def _record(self, notice: Notice) -> None:
        with self._lock:
            first = notice.source not in self._notices
            # Keep the first sighting's time; take a deadline learnt later (a file rewritten).
            old = self._notices.get(notice.source)
            if old is not None:
                notice = Notice(notice.source, notice.deadline, notice.detail, old.received)
            self._notices[notice.source] = notice
            best: Notice | None = None
            for n in self._notices.values():
                if _more_urgent(n, best):
                    best = n
            self._pending = best
        if first:
            log.warning("preemption notice from %s: %s (deadline %s)", notice.source,
                        notice.detail, notice.deadline)
        self._fired.set()


def build_sources(names: Iterable[str], cfg: NoticesConfig | None = None,
                  notice_file: str = "") -> list[NoticeSource]:
    """Sources by name (see `SOURCE_NAMES`), with base URLs, claim file and timeout from `cfg`
    (empty: the clouds' own addresses). `file` is skipped when `notice_file` is empty.
    Raises ValueError naming an unknown source."""
    cfg = NoticesConfig() if cfg is None else cfg
    sources: list[NoticeSource] = []
    for name in dict.fromkeys(n.strip().lower() for n in names if n.strip()):
        if name == "aws":
            sources.append(AwsSource(cfg.aws_url or AWS_BASE_URL, cfg.timeout_s))
        elif name == "gcp":
            sources.append(GcpSource(cfg.gcp_url or GCP_BASE_URL, cfg.timeout_s))
        elif name == "azure":
            sources.append(AzureSource(cfg.azure_url or AZURE_BASE_URL, max(cfg.timeout_s, 0.5)))
        elif name == "skypilot":
            sources.append(SkyPilotSource(cfg.skypilot_claim_file or SKYPILOT_CLAIM_FILE))
        elif name == "file":
            if notice_file:
                sources.append(FileSource(notice_file))
        elif name == "signal":
            sources.append(SignalSource())
        else:
            raise ValueError(f"unknown notice source {name!r}; expected some of "
                             f"{', '.join(SOURCE_NAMES)}")
    return sources


def build_watcher(cfg: NoticesConfig, env: dict[str, str] | None = None, start: bool = True
                  ) -> NoticeWatcher:
    """The watcher a trainer worker wants, from the `[notices]` config section and the two
    variables others set: ELASTIC_TRAIN_NOTICE_FILE (the node launcher) and
    SKYPILOT_CLUSTER_INFO (SkyPilot).

    Sources: `cfg.sources`; empty: `file,signal,skypilot`, plus the cloud named in
    SKYPILOT_CLUSTER_INFO when it is one of aws/gcp/azure. `file` and `signal` are always added:
    they cost nothing. The signal source is dropped, with a log line, when not called from the
    main thread. Raises ValueError for an unknown source name.
    """
    env = dict(os.environ) if env is None else env
    if cfg.sources.strip():
        names = [n for n in cfg.sources.split(",") if n.strip()]
    else:
        names = list(DEFAULT_SOURCES)
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            cloud = str(json.loads(env.get("SKYPILOT_CLUSTER_INFO", "{}")).get("cloud", ""))
            if cloud.lower() in ("aws", "gcp", "azure"):
                names.append(cloud.lower())
    names += ["file", "signal"]
    sources = build_sources(names, cfg, env.get(NOTICE_FILE_ENV, ""))
    if threading.current_thread() is not threading.main_thread():
        log.info("notice watcher built outside the main thread: no signal source")
        sources = [s for s in sources if not isinstance(s, SignalSource)]
    watcher = NoticeWatcher(sources, cfg.interval_s)
    return watcher.start() if start else watcher
