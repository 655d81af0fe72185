"""A fault-injecting HTTP proxy between an object-store client and a loopback S3/GCS server.

Point the client's endpoint at `proxy.endpoint_url`; every request is forwarded to the upstream
server unless a fault rule matches it. Rules are added at runtime from any thread:

    proxy.inject("error", status=503, count=2, match=r"PUT .*distcp")  # S3-style SlowDown body
    proxy.inject("reset", count=1)            # connection reset before any response
    proxy.inject("truncate", match="GET")     # headers promise N bytes, half arrive, then a reset
    proxy.inject("delay", delay_s=2.0)        # forward after a pause
    proxy.inject("error_after_success")       # upstream applies the request; the client sees 500
    proxy.inject("drop", delay_s=30)          # hold the request, never forward it, then reset:
                                              # a request lost in flight (e.g. its sender died)
    proxy.outage(5.0)                         # every request fails for 5 s

Every fault that fires is appended to `proxy.fired`; `assert_all_fired()` raises if a rule with a
count never used it all up, so a test cannot pass because its fault silently missed.
"""

from __future__ import annotations

import collections
import http.client
import json
import re
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import urlsplit

FaultKind = Literal["error", "reset", "truncate", "delay", "error_after_success", "drop"]
KINDS: tuple[str, ...] = ("error", "reset", "truncate", "delay", "error_after_success", "drop")

_HOP_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                "trailers", "transfer-encoding", "upgrade", "content-length"}
_S3_CODES = {500: "InternalError", 502: "BadGateway", 503: "SlowDown", 504: "GatewayTimeout",
             429: "TooManyRequestsException", 400: "BadRequest", 403: "AccessDenied",
             404: "NoSuchKey"}


@dataclass
class FaultRule:
    """One injected fault. `count=None` fires forever; `match` is a regex searched in
    "METHOD /path?query"."""

    kind: FaultKind
    count: int | None = 1
    match: str | None = None
    status: int = 503
    delay_s: float = 1.0
    fired: int = 0
    _pattern: re.Pattern[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {', '.join(KINDS)}")
        self._pattern = re.compile(self.match) if self.match else None

    def wants(self, request_line: str) -> bool:
        if self.count is not None and self.fired >= self.count:
            return False
        return self._pattern is None or bool(self._pattern.search(request_line))

    @property
    def exhausted(self) -> bool:
        return self.count is not None and self.fired >= self.count


@dataclass(frozen=True)
class FiredFault:
    kind: str
    method: str
    path: str
    status: int | None
    time: float


class FaultProxy:
    """A threaded HTTP/1.1 proxy on a free loopback port (see the module docstring).

    `flavor` picks error bodies: "s3" (XML with an S3 error code, which botocore classifies) or
    "gcs" (JSON). Context manager; `stop()` is idempotent. Never raises into the client's
    thread: an upstream failure becomes a 502 to the client.
    """

    def __init__(self, upstream_url: str, flavor: Literal["s3", "gcs"] = "s3") -> None:
        parts = urlsplit(upstream_url)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.flavor = flavor
        self.rules: list[FaultRule] = []
        self.fired: list[FiredFault] = []
        self.requests: collections.deque[tuple[str, str]] = collections.deque(maxlen=100_000)
        self._outage_until = 0.0
        self._outage_kind: FaultKind = "error"
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()  # set by clear()/stop(): held requests stop waiting

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> FaultProxy:
        if self._server is not None:
            return self
        handler = type("Handler", (_ProxyHandler,), {"proxy": self})
        self._server = _QuietServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, name="fault-proxy",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._wake.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("proxy not started")
        return self._server.server_address[1]

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- control -------------------------------------------------------------------------
    def inject(self, kind: FaultKind, count: int | None = 1, match: str | None = None,
               status: int = 503, delay_s: float = 1.0) -> FaultRule:
        """Add a rule; rules are tried in the order added, the first that wants a request fires."""
        rule = FaultRule(kind, count=count, match=match, status=status, delay_s=delay_s)
        with self._lock:
            self.rules.append(rule)
        return rule

    def outage(self, seconds: float, kind: Literal["error", "reset"] = "error") -> None:
        """Fail every request (503 or connection reset) for the next `seconds`."""
        with self._lock:
            self._outage_until = time.monotonic() + seconds
            self._outage_kind = kind

    def clear(self) -> None:
        """Drop every rule and end any outage (what fired stays recorded)."""
        with self._lock:
            self.rules.clear()
            self._outage_until = 0.0
            wake, self._wake = self._wake, threading.Event()
        wake.set()

    def _hold(self, seconds: float) -> None:
        """Sleep for a delay/drop fault; cut short by clear() or stop()."""
        self._wake.wait(seconds)

    def pending(self) -> list[FaultRule]:
        """Rules with a count that have not fired that many times yet."""
        with self._lock:
            return [r for r in self.rules if r.count is not None and not r.exhausted]

    def assert_all_fired(self) -> None:
        left = self.pending()
        if left:
            raise AssertionError(f"injected faults that never fired: {left}")

    def fired_kinds(self) -> list[str]:
        with self._lock:
            return [f.kind for f in self.fired]

    # -- used by the handler -------------------------------------------------------------
    def _pick(self, method: str, path: str) -> tuple[str, FaultRule | None]:
        """("outage", None), (kind, rule) or ("", None); records the fault as fired."""
        line = f"{method} {path}"
        with self._lock:
            self.requests.append((method, path))
            if time.monotonic() < self._outage_until:
                self.fired.append(FiredFault("outage", method, path,
                                             503 if self._outage_kind == "error" else None,
                                             time.time()))
                return "outage", None
            for rule in self.rules:
                if rule.wants(line):
                    rule.fired += 1
                    status = rule.status if rule.kind in ("error", "error_after_success") \
                        else None
                    self.fired.append(FiredFault(rule.kind, method, path, status, time.time()))
                    return rule.kind, rule
        return "", None

    def error_body(self, status: int, path: str) -> tuple[bytes, str]:
        if self.flavor == "gcs":
            body = {"error": {"code": status, "message": f"injected fault {status}",
                              "errors": [{"reason": "backendError"}]}}
            return json.dumps(body).encode(), "application/json"
        code = _S3_CODES.get(status, "InternalError")
        xml = ('<?xml version="1.0" encoding="UTF-8"?>\n'
               f"<Error><Code>{code}</Code><Message>injected fault {status}</Message>"
               f"<Resource>{path}</Resource><RequestId>fault-proxy</RequestId></Error>")
        return xml.encode(), "application/xml"


class _QuietServer(ThreadingHTTPServer):
    """Clients here are workers that chaos kills mid-request: a reset connection is expected and
    must not print a traceback into the run's output. Anything else still does."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _ProxyHandler(BaseHTTPRequestHandler):
    proxy: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # quiet: request lines may carry signed URLs

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_GET

    def _handle(self) -> None:
        body = self._read_body()
        kind, rule = self.proxy._pick(self.command, self.path)
        if kind == "outage":
            if self.proxy._outage_kind == "reset":
                self._reset()
            else:
                self._send_error(503)
            return
        if kind == "reset":
            self._reset()
            return
        if kind == "drop":
            assert rule is not None
            self.proxy._hold(rule.delay_s)
            self._reset()
            return
        if kind == "error":
            assert rule is not None
            self._send_error(rule.status)
            return
        if kind == "delay":
            assert rule is not None
            self.proxy._hold(rule.delay_s)
        try:
            status, headers, payload = self._forward(body)
        except OSError:
            self._send_error(502)
            return
        if kind == "error_after_success":
            assert rule is not None
            self._send_error(rule.status)
            return
        if kind == "truncate":
            self._send(status, headers, payload, truncate=True)
            return
        self._send(status, headers, payload)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        proxy = self.proxy
        conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            if body or self.command in ("PUT", "POST", "PATCH"):
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            upstream = f"{proxy.upstream_host}:{proxy.upstream_port}"
            out = []
            for k, v in resp.getheaders():
                if k.lower() in _HOP_HEADERS and not (self.command == "HEAD"
                                                      and k.lower() == "content-length"):
                    continue
                if k.lower() == "location":
                    # Resumable uploads (GCS) continue at a URL the server names: keep it on us.
                    v = v.replace(upstream, f"127.0.0.1:{proxy.port}")
                out.append((k, v))
            return resp.status, out, payload
        finally:
            conn.close()

    def _send(self, status: int, headers: list[tuple[str, str]], payload: bytes,
              truncate: bool = False) -> None:
        self.send_response_only(status)
        for k, v in headers:
            self.send_header(k, v)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(payload)))
        if truncate:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        if truncate:
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self._reset()
            return
        self.wfile.write(payload)

    def _send_error(self, status: int) -> None:
        body, content_type = self.proxy.error_body(status, self.path)
        self.send_response_only(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        if status in (429, 503):
            self.send_header("Retry-After", "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = True

    def _reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0): the client sees 'connection reset by peer'."""
        self.close_connection = True
        try:
            self.wfile.flush()
        except OSError:
            pass
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass  # the socket was reset on purpose
