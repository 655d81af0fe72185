"""The fault-injecting proxy and the loopback servers, spoken to with plain HTTP."""

from __future__ import annotations

import http.client
import os
import time

import pytest

from chaos.proxy import FaultProxy
from chaos.services import MotoS3Server

pytestmark = pytest.mark.timeout(60)


def call(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        # moto refuses anonymous reads of private objects: make what we write public.
        headers = {"x-amz-acl": "public-read"} if method == "PUT" else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture
def proxied(moto_server: MotoS3Server):
    moto_server.reset()
    with FaultProxy(moto_server.endpoint_url) as proxy:
        assert call(proxy.port, "PUT", "/bucket")[0] == 200
        yield proxy, moto_server.port


def test_clean_requests_pass_through_unchanged(proxied):
    proxy, upstream = proxied
    assert call(proxy.port, "PUT", "/bucket/a", b"hello")[0] == 200
    assert call(upstream, "GET", "/bucket/a") == (200, b"hello")
    assert call(proxy.port, "GET", "/bucket/a") == (200, b"hello")
    assert proxy.fired == [] and ("GET", "/bucket/a") in proxy.requests


def test_http_errors_carry_an_s3_error_code_and_do_not_reach_the_server(proxied):
    proxy, upstream = proxied
    for status, code in ((503, b"SlowDown"), (500, b"InternalError"),
                         (429, b"TooManyRequestsException")):
        proxy.inject("error", status=status, match="PUT /bucket/e")
        got, body = call(proxy.port, "PUT", "/bucket/e", b"x")
        assert got == status and b"<Code>" + code + b"</Code>" in body
    assert call(upstream, "GET", "/bucket/e")[0] == 404
    assert [f.status for f in proxy.fired] == [503, 500, 429]
    proxy.assert_all_fired()


def test_error_after_success_applies_the_request_but_answers_500(proxied):
    proxy, upstream = proxied
    proxy.inject("error_after_success", status=500, match="PUT")
    assert call(proxy.port, "PUT", "/bucket/k", b"data")[0] == 500
    assert call(upstream, "GET", "/bucket/k") == (200, b"data")


def test_reset_truncate_drop_delay_and_matching(proxied):
    proxy, upstream = proxied
    call(upstream, "PUT", "/bucket/big", b"z" * 100_000)
    proxy.inject("reset", match="GET /bucket/big")
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        call(proxy.port, "GET", "/bucket/big")
    proxy.inject("truncate", match="GET /bucket/big")
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        call(proxy.port, "GET", "/bucket/big")
    proxy.inject("drop", delay_s=0.2, match="PUT /bucket/dropped")
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        call(proxy.port, "PUT", "/bucket/dropped", b"never")
    assert call(upstream, "GET", "/bucket/dropped")[0] == 404
    proxy.inject("delay", delay_s=0.3, match="GET /bucket/big")
    t0 = time.monotonic()
    assert call(proxy.port, "GET", "/bucket/other")[0] == 404  # not matched: no delay
    assert call(proxy.port, "GET", "/bucket/big")[0] == 200
    assert time.monotonic() - t0 >= 0.3
    assert proxy.fired_kinds() == ["reset", "truncate", "drop", "delay"]
    proxy.assert_all_fired()


def test_outage_fails_everything_until_it_ends_and_unfired_rules_are_reported(proxied):
    proxy, _ = proxied
    proxy.outage(0.5)
    assert call(proxy.port, "GET", "/bucket")[0] == 503
    assert call(proxy.port, "PUT", "/bucket/x", b"1")[0] == 503
    time.sleep(0.6)
    assert call(proxy.port, "PUT", "/bucket/x", b"1")[0] == 200
    assert proxy.fired_kinds() == ["outage", "outage"]
    proxy.inject("error", match="DELETE")
    with pytest.raises(AssertionError, match="never fired"):
        proxy.assert_all_fired()
    with pytest.raises(ValueError, match="unknown fault kind 'boom'"):
        proxy.inject("boom")  # type: ignore[arg-type]


def test_gcs_flavour_answers_json_errors(gcs_emulator):
    with FaultProxy(gcs_emulator.endpoint_url, flavor="gcs") as proxy:
        proxy.inject("error", status=503)
        status, body = call(proxy.port, "GET", "/storage/v1/b")
        assert status == 503 and b'"code": 503' in body
        assert call(proxy.port, "GET", "/storage/v1/b")[0] == 200


def test_servers_leave_no_process_behind():
    server = MotoS3Server().start()
    pid = server.pid
    assert pid is not None and call(server.port, "GET", "/moto-api/")[0] == 200
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
