"""``start_metrics_server``: the ``llmserve:`` names reach every scraper unchanged.

prometheus_client answers an OpenMetrics Accept header (what Prometheus 2.x and the OpenTelemetry
collector send) with ``llmserve_...`` sample names under ``llmserve:...`` metadata; the server must
answer every scraper in the text format instead, so dashboards and alerts find the real names.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from llmserve.telemetry.metrics import MetricsServer, start_metrics_server

PROMETHEUS_2_ACCEPT = ("application/openmetrics-text;version=1.0.0,"
                       "application/openmetrics-text;version=0.0.1;q=0.75,"
                       "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def counted_registry(count: int) -> CollectorRegistry:
    """A registry holding ``llmserve:router_requests_total{model="m"} count``."""
    registry = CollectorRegistry()
    Counter("llmserve:router_requests", "Requests.", ["model"], registry=registry).labels("m").inc(count)
    return registry


@pytest.fixture
def served() -> Iterator[MetricsServer]:
    server = start_metrics_server(0, counted_registry(3), "127.0.0.1")
    yield server
    server.stop()


@pytest.mark.parametrize("accept", ["", "text/plain; version=0.0.4", PROMETHEUS_2_ACCEPT,
                                    "application/openmetrics-text; version=1.0.0"])
def test_names_keep_their_colon_whatever_the_scraper_accepts(served: MetricsServer, accept: str) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{served.port}/metrics", headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=5) as reply:
        content_type = reply.headers["Content-Type"]
        text = reply.read().decode()
    assert content_type.startswith("text/plain; version=0.0.4")
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["llmserve:router_requests_total"] == 3
    assert not any(name.startswith("llmserve_") for name in samples), sorted(samples)


def test_stop_releases_the_port(served: MetricsServer) -> None:
    port = served.port
    served.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_idle_connections_hold_a_bounded_number_of_threads_for_a_bounded_time(
        capfd: pytest.CaptureFixture[str]) -> None:
    server = start_metrics_server(0, counted_registry(1), "127.0.0.1", read_timeout_s=2.0, max_connections=4)
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(50)]
    try:
        time.sleep(0.2)
        serving = [t for t in threading.enumerate() if "process_request_thread" in t.name]
        assert 1 <= len(serving) <= 4, len(serving)
        for sock in idle:  # each either timed out or was closed unanswered: the server hung up
            sock.settimeout(10)
            assert sock.recv(1) == b""
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as reply:
            assert b"llmserve:router_requests_total" in reply.read()
    finally:
        for sock in idle:
            sock.close()
        server.stop()
    assert "Traceback" not in capfd.readouterr().err


def test_a_connection_trickling_its_request_is_cut_at_its_deadline() -> None:
    """The read timeout alone restarts with every byte: each connection also has a deadline."""
    server = start_metrics_server(0, counted_registry(1), "127.0.0.1", read_timeout_s=1.0, max_connections=2)
    trickling = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
    try:
        cut: set[int] = set()
        for _ in range(40):  # a byte per connection every 0.25 s, for up to 10 s
            for sock in trickling:
                try:
                    sock.sendall(b"G")
                except OSError:
                    pass
            time.sleep(0.25)
            for i, sock in enumerate(trickling):
                sock.setblocking(False)
                try:
                    if sock.recv(1) == b"":
                        cut.add(i)
                except BlockingIOError:
                    pass
                except OSError:
                    cut.add(i)  # reset: cut as well
            if len(cut) == len(trickling):
                break
        assert len(cut) == len(trickling), "a trickling connection outlived its deadline"
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as reply:
            assert b"llmserve:router_requests_total" in reply.read()
    finally:
        for sock in trickling:
            sock.close()
        server.stop()
