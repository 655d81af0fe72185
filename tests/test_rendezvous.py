"""The `c10d-fast` rendezvous backend: torchrun finds it, its settings take effect, nodes form a
world with it, and a bad setting fails with one line."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

from elastic_train.rendezvous import FAST_BACKEND, RendezvousSettings, host_store


def _params(port: int, **conf: object) -> RendezvousParameters:
    return RendezvousParameters(backend=FAST_BACKEND, endpoint=f"127.0.0.1:{port}",
                                run_id="test-fast", min_nodes=2, max_nodes=3,
                                local_addr="127.0.0.1", **conf)


def _conf(settings: RendezvousSettings) -> dict[str, str]:
    return dict(kv.split("=") for kv in settings.conf().split(","))


def test_torchrun_finds_the_fast_backend_and_applies_fractional_settings() -> None:
    store = host_store("127.0.0.1", 0)
    handler = get_rendezvous_handler(_params(store.port, **_conf(RendezvousSettings.fast())))
    assert handler.get_backend() == FAST_BACKEND
    settings = handler.settings
    assert settings.keep_alive_interval == timedelta(seconds=0.5)
    assert settings.keep_alive_max_attempt == 3
    assert settings.timeout.last_call == timedelta(seconds=0.5)
    assert handler._state_holder._cache_duration == 0.1


def test_nodes_form_one_world_on_the_fast_backend() -> None:
    store = host_store("127.0.0.1", 0)
    conf = _conf(RendezvousSettings(last_call_timeout=0.2))
    results: list[tuple[int, int]] = []

    def node() -> None:
        info = get_rendezvous_handler(_params(store.port, **conf)).next_rendezvous()
        results.append((info.rank, info.world_size))

    threads = [threading.Thread(target=node) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [(0, 2), (1, 2)]


@pytest.mark.parametrize(("key", "value"), [("poll_interval", "fast"),
                                            ("keep_alive_interval", "0"),
                                            ("last_call_timeout", "-1")])
def test_a_bad_setting_fails_with_one_line_naming_it(key: str, value: str) -> None:
    store = host_store("127.0.0.1", 0)
    with pytest.raises(ValueError) as err:
        get_rendezvous_handler(_params(store.port, is_host="false", **{key: value}))
    message = str(err.value)
    assert f"{key}={value!r}" in message and "expected" in message and "\n" not in message
