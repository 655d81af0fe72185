"""Preemption notice sources against loopback servers that answer as each cloud documents."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from elastic_train.config import NoticesConfig
from elastic_train.config import load as load_config
from elastic_train.node.contract import NOTICE_FILE_ENV
from elastic_train.notices import (
    AwsSource,
    AzureSource,
    FileSource,
    GcpSource,
    Notice,
    NoticeSource,
    NoticeWatcher,
    SignalSource,
    SkyPilotSource,
    build_watcher,
)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that gave up on a slow answer: expected here


class FakeCloud:
    """A metadata server on a free loopback port. `state` is what the test changes (notice or
    not); `requests` records (method, path, headers) of every request. A handler that must not
    answer in time waits on `release`, which `close()` sets."""

    def __init__(self, handle: Callable[[FakeCloud, BaseHTTPRequestHandler], None]) -> None:
        self.state: dict = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.release = threading.Event()
        self._arrived = threading.Condition()
        cloud = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                with cloud._arrived:
                    cloud.requests.append((self.command, self.path, dict(self.headers)))
                    cloud._arrived.notify_all()
                handle(cloud, self)

            do_GET = do_PUT = _any

            def log_message(self, *args: object) -> None:
                pass

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def wait_for_requests(self, n: int, timeout_s: float = 10.0) -> None:
        """Block until `n` requests in all have arrived; fails the test after `timeout_s`."""
        with self._arrived:
            assert self._arrived.wait_for(lambda: len(self.requests) >= n, timeout_s), (
                f"{len(self.requests)} of {n} requests arrived")

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class CountingSource:
    """A source that counts its polls and passes them on to `inner`."""

    def __init__(self, inner: NoticeSource) -> None:
        self.inner = inner
        self.name, self.is_remote = inner.name, inner.is_remote
        self.polls = 0

    def poll(self) -> Notice | None:
        self.polls += 1
        return self.inner.poll()


def reply(h: BaseHTTPRequestHandler, status: int, body: bytes | str = b"",
          headers: dict[str, str] | None = None) -> None:
    data = body.encode() if isinstance(body, str) else body
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)


def aws_imds(cloud: FakeCloud, h: BaseHTTPRequestHandler) -> None:
    """EC2 IMDS with IMDSv2 required: a token from PUT /latest/api/token (TTL header needed);
    instance-action is 404 until a notice, 401 without a valid token."""
    path = urlsplit(h.path).path
    if h.command == "PUT" and path == "/latest/api/token":
        if "X-aws-ec2-metadata-token-ttl-seconds" not in h.headers:
            return reply(h, 400)
        token = f"tok{len(cloud.state.setdefault('tokens', []))}"
        cloud.state["tokens"].append(token)
        return reply(h, 200, token)
    if h.headers.get("X-aws-ec2-metadata-token") not in cloud.state.get("tokens", []):
        return reply(h, 401)
    if path == "/latest/meta-data/spot/instance-action":
        if "action" not in cloud.state:
            return reply(h, 404, "<?xml?><Error>Not Found</Error>")
        return reply(h, 200, json.dumps({"action": cloud.state["action"],
                                         "time": cloud.state["time"]}))
    return reply(h, 404)


def gce_metadata(cloud: FakeCloud, h: BaseHTTPRequestHandler) -> None:
    """GCE metadata: needs `Metadata-Flavor: Google`, answers with it; preempted TRUE/FALSE."""
    flavor = {"Metadata-Flavor": "Google"}
    if h.headers.get("Metadata-Flavor") != "Google":
        return reply(h, 403, "Missing Metadata-Flavor:Google header.", flavor)
    if urlsplit(h.path).path == "/computeMetadata/v1/instance/preempted":
        return reply(h, 200, "TRUE" if cloud.state.get("preempted") else "FALSE", flavor)
    return reply(h, 404, "", flavor)


def azure_imds(cloud: FakeCloud, h: BaseHTTPRequestHandler) -> None:
    """Azure IMDS: `Metadata: true` required; Scheduled Events document; compute name."""
    parts = urlsplit(h.path)
    if h.headers.get("Metadata") != "true":
        return reply(h, 400, json.dumps({"error": "Bad request. Required metadata header"}))
    if "api-version" not in parse_qs(parts.query):
        return reply(h, 400, json.dumps({"error": "Bad request. api-version was not specified"}))
    if parts.path == "/metadata/scheduledevents":
        return reply(h, 200, json.dumps({"DocumentIncarnation": len(cloud.state.get("events", [])),
                                         "Events": cloud.state.get("events", [])}),
                     {"Content-Type": "application/json"})
    if parts.path == "/metadata/instance/compute/name":
        return reply(h, 200, cloud.state.get("name", "vm-a"))
    return reply(h, 404)


@pytest.fixture
def serve() -> Iterator[Callable[..., FakeCloud]]:
    clouds: list[FakeCloud] = []

    def make(handle: Callable[[FakeCloud, BaseHTTPRequestHandler], None]) -> FakeCloud:
        clouds.append(FakeCloud(handle))
        return clouds[-1]

    yield make
    for c in clouds:
        c.close()


def test_aws_no_notice_is_404_then_instance_action_gives_deadline(serve):
    cloud = serve(aws_imds)
    src = AwsSource(cloud.url)
    assert src.poll() is None
    put = [r for r in cloud.requests if r[0] == "PUT"]
    assert len(put) == 1 and put[0][2]["X-aws-ec2-metadata-token-ttl-seconds"] == "21600"
    cloud.state.update(action="terminate", time="2026-11-23T16:00:00Z")
    notice = src.poll()
    assert notice is not None and notice.source == "aws"
    assert notice.deadline == pytest.approx(1795449600.0)
    assert "terminate" in notice.detail
    assert len([r for r in cloud.requests if r[0] == "PUT"]) == 1, "token is reused"


def test_aws_refetches_a_rejected_token(serve):
    cloud = serve(aws_imds)
    src = AwsSource(cloud.url)
    assert src.poll() is None
    cloud.state["tokens"] = []  # the server forgot every token
    with pytest.raises(OSError):
        src.poll()
    assert src.poll() is None
    assert len([r for r in cloud.requests if r[0] == "PUT"]) == 2


def test_aws_falls_back_to_imdsv1_when_the_token_answer_never_arrives(serve):
    def hop_limited(cloud: FakeCloud, h: BaseHTTPRequestHandler) -> None:
        # IMDSv1 allowed; the PUT's answer is lost on the way (IMDS hop limit 1 in a container).
        path = urlsplit(h.path).path
        if h.command == "PUT":
            cloud.release.wait()  # answered only once the test is over
            return reply(h, 200, "late")
        if path == "/latest/meta-data/instance-id":
            return reply(h, 200, "i-0123456789abcdef0")
        if path == "/latest/meta-data/spot/instance-action" and "action" in cloud.state:
            return reply(h, 200, json.dumps({"action": "stop", "time": "2026-11-23T16:00:00Z"}))
        return reply(h, 404)

    cloud = serve(hop_limited)
    watcher = NoticeWatcher([AwsSource(cloud.url, timeout_s=0.1)], absent_after=1)
    assert watcher.poll_once() is None
    assert watcher.poll_once() is None and watcher.sources == ["aws"]
    cloud.state["action"] = "stop"
    notice = watcher.poll_once()
    assert notice is not None and "stop" in notice.detail


def test_gcp_preempted_false_then_true(serve):
    cloud = serve(gce_metadata)
    src = GcpSource(cloud.url)
    assert src.poll() is None
    cloud.state["preempted"] = True
    notice = src.poll()
    assert notice is not None and notice.source == "gcp" and notice.deadline is None
    assert notice.seconds_left(now=notice.received) == 30.0  # GCE's documented warning
    assert all(r[2].get("Metadata-Flavor") == "Google" for r in cloud.requests)


def test_azure_preempt_event_for_this_vm_only(serve):
    cloud = serve(azure_imds)
    src = AzureSource(cloud.url)
    assert src.poll() is None
    not_before = time.time() + 30
    cloud.state["events"] = [
        {"EventId": "r1", "EventType": "Reboot", "ResourceType": "VirtualMachine",
         "Resources": ["vm-a"], "EventStatus": "Scheduled", "NotBefore": formatdate(usegmt=True),
         "Description": "", "EventSource": "Platform", "DurationInSeconds": -1},
        {"EventId": "p-other", "EventType": "Preempt", "ResourceType": "VirtualMachine",
         "Resources": ["vm-b"], "EventStatus": "Scheduled", "NotBefore": formatdate(usegmt=True),
         "Description": "", "EventSource": "Platform", "DurationInSeconds": -1},
    ]
    assert src.poll() is None, "a reboot, and another VM's preemption, are not ours"
    cloud.state["events"].append(
        {"EventId": "p1", "EventType": "Preempt", "ResourceType": "VirtualMachine",
         "Resources": ["vm-a"], "EventStatus": "Scheduled",
         "NotBefore": formatdate(not_before, usegmt=True), "Description": "",
         "EventSource": "Platform", "DurationInSeconds": -1})
    notice = src.poll()
    assert notice is not None and notice.source == "azure" and "p1" in notice.detail
    assert notice.deadline == pytest.approx(int(not_before), abs=1)
    assert all(r[2].get("Metadata") == "true" for r in cloud.requests)


def test_sources_on_the_wrong_cloud_are_dropped_at_once(serve):
    gce, aws = serve(gce_metadata), serve(aws_imds)
    watcher = NoticeWatcher([AwsSource(gce.url), GcpSource(aws.url), AzureSource(aws.url)])
    assert watcher.poll_once() is None
    assert sorted(watcher.absent) == ["aws", "azure", "gcp"] and watcher.sources == []
    n = len(gce.requests) + len(aws.requests)
    watcher.poll_once()
    assert len(gce.requests) + len(aws.requests) == n, "absent sources are not polled again"


def test_an_unreachable_endpoint_is_tried_absent_after_times_then_never_again(serve):
    cloud = serve(aws_imds)
    url = cloud.url
    cloud.close()  # nothing listens there now: connection refused
    sources = [CountingSource(s) for s in (AwsSource(url), GcpSource(url), AzureSource(url))]
    watcher = NoticeWatcher(sources, absent_after=3)
    for _ in range(5):
        watcher.poll_once()
    assert sorted(watcher.absent) == ["aws", "azure", "gcp"]
    assert [s.polls for s in sources] == [3, 3, 3]


def test_a_slow_answer_after_connecting_is_not_absence(serve):
    def slow(cloud: FakeCloud, h: BaseHTTPRequestHandler) -> None:
        cloud.release.wait()  # connected, but the answer comes only once the test is over
        azure_imds(cloud, h)

    cloud = serve(slow)
    watcher = NoticeWatcher([AzureSource(cloud.url, timeout_s=0.1)], absent_after=1)
    for _ in range(2):
        watcher.poll_once()
    assert watcher.absent == [] and watcher.sources == ["azure"]


def test_a_5xx_while_the_service_starts_is_not_absence(serve):
    def starting(cloud: FakeCloud, h: BaseHTTPRequestHandler) -> None:
        cloud.state["n"] = cloud.state.get("n", 0) + 1
        if cloud.state["n"] <= 2:
            return reply(h, 503)
        azure_imds(cloud, h)

    cloud = serve(starting)
    watcher = NoticeWatcher([AzureSource(cloud.url)], absent_after=3)
    for _ in range(4):
        watcher.poll_once()
    assert watcher.sources == ["azure"] and watcher.absent == []


def test_a_source_that_answered_once_is_never_dropped(serve):
    cloud = serve(gce_metadata)
    watcher = NoticeWatcher([GcpSource(cloud.url)], absent_after=1)
    watcher.poll_once()
    cloud.close()
    watcher.poll_once()
    watcher.poll_once()
    assert watcher.sources == ["gcp"]


def test_pending_makes_no_request_and_returns_what_the_last_poll_found(serve):
    cloud = serve(gce_metadata)
    cloud.state["preempted"] = True
    watcher = NoticeWatcher([GcpSource(cloud.url)])
    assert watcher.pending() is None
    notice = watcher.poll_once()
    asked = len(cloud.requests)
    assert [watcher.pending() for _ in range(1000)] == [notice] * 1000
    assert len(cloud.requests) == asked, "pending() does no I/O"


def test_watcher_thread_sees_a_notice_and_keeps_it(serve):
    cloud = serve(gce_metadata)
    with NoticeWatcher([GcpSource(cloud.url)], interval_s=0.02) as watcher:
        cloud.wait_for_requests(2)  # the first answer (FALSE) has been read
        assert watcher.pending() is None
        cloud.state["preempted"] = True
        notice = watcher.wait(10.0)
        assert notice is not None and notice.source == "gcp"
        cloud.state["preempted"] = False
        # The next request is answered FALSE; the one after it arrives once that was read.
        cloud.wait_for_requests(len(cloud.requests) + 2)
        assert watcher.pending() == notice, "a notice is sticky"


def test_file_source_empty_json_and_garbage(tmp_path):
    path = tmp_path / "notice"
    src = FileSource(str(path))
    assert src.poll() is None
    path.write_text("")
    n = src.poll()
    assert n is not None and n.source == "file" and n.deadline is None
    path.write_text(json.dumps({"deadline": 1234.5, "detail": "chaos preempt_node"}))
    n = src.poll()
    assert n is not None and n.deadline == 1234.5 and "chaos" in n.detail
    path.write_text("not json")
    n = src.poll()
    assert n is not None and n.deadline is None


def test_watcher_keeps_the_first_sighting_time_and_a_deadline_learnt_later(tmp_path):
    path = tmp_path / "notice"
    path.write_text("")  # written in two steps: the deadline comes a moment later
    watcher = NoticeWatcher([FileSource(str(path))])
    first = watcher.poll_once()
    assert first is not None and first.deadline is None
    path.write_text(json.dumps({"deadline": time.time() + 20}))
    second = watcher.poll_once()
    assert second is not None and second.deadline is not None
    assert second.received == first.received


def test_most_urgent_notice_wins(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text(json.dumps({"deadline": 2000.0}))
    b.write_text(json.dumps({"deadline": 1000.0}))
    watcher = NoticeWatcher([FileSource(str(a)), FileSource(str(b))])
    notice = watcher.poll_once()
    assert notice is not None and notice.deadline == 1000.0


def test_skypilot_claim_file(tmp_path):
    claim = tmp_path / ".teardown_claim"
    src = SkyPilotSource(str(claim))
    assert src.poll() is None
    claim.write_text("down")
    assert src.poll() is None, "a planned teardown is not a preemption"
    claim.write_text("preemption")
    n = src.poll()
    assert n is not None and n.source == "skypilot"


def test_sigusr1_is_a_notice_and_the_old_handler_comes_back():
    before = signal.getsignal(signal.SIGUSR1)
    watcher = NoticeWatcher([SignalSource()], interval_s=10.0).start()
    try:
        assert watcher.pending() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        notice = watcher.wait(2.0)  # the handler wakes the poll thread: no 10 s wait
        assert notice is not None and notice.source == "signal" and "SIGUSR1" in notice.detail
    finally:
        watcher.close()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_a_broken_source_does_not_kill_the_watcher(tmp_path):
    class Broken:
        name, is_remote = "broken", False

        def poll(self) -> Notice | None:
            raise RuntimeError("bug")

    path = tmp_path / "notice"
    path.write_text("")
    with NoticeWatcher([Broken(), FileSource(str(path))], interval_s=0.02) as watcher:
        assert watcher.wait(2.0) is not None


def test_build_watcher_picks_sources_from_config_and_skypilot(tmp_path, serve):
    cloud = serve(aws_imds)
    cfg = load_config(None, {"notices.sources": "aws", "notices.aws_url": cloud.url}).notices
    watcher = build_watcher(cfg, {NOTICE_FILE_ENV: str(tmp_path / "n")}, start=False)
    assert watcher.sources == ["aws", "file", "signal"]
    env = {"SKYPILOT_CLUSTER_INFO": json.dumps({"cloud": "GCP", "region": "us-central1"})}
    assert sorted(build_watcher(NoticesConfig(), env, start=False).sources) == \
        ["gcp", "signal", "skypilot"]
    with pytest.raises(ValueError, match="unknown notice source 'ibm'"):
        build_watcher(NoticesConfig(sources="aws,ibm"), {}, start=False)


def test_build_watcher_end_to_end_with_a_file(tmp_path):
    path = tmp_path / "notice"
    cfg = NoticesConfig(interval_s=0.02, skypilot_claim_file=str(tmp_path / "claim"))
    with build_watcher(cfg, {NOTICE_FILE_ENV: str(path)}) as watcher:
        assert watcher.pending() is None
        deadline = time.time() + 10
        tmp = tmp_path / "notice.tmp"
        tmp.write_text(json.dumps({"deadline": deadline}))
        os.replace(tmp, path)
        notice = watcher.wait(2.0)
    assert notice is not None and notice.deadline == deadline
    assert notice.seconds_left(now=deadline - 10) == 10
