"""deploy/grpc_health_check.py (llmserve-healthcheck in the images) against a real gRPC server."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2

from tests.deploy.deploy_manifests import HEALTHCHECK_SCRIPT


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    from grpc_health.v1 import health_pb2_grpc

    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


def _probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HEALTHCHECK_SCRIPT), *args],
                          capture_output=True, text=True, timeout=30)


def test_serving_exits_zero(health_server: tuple[str, health.HealthServicer]) -> None:
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    result = _probe(address)
    assert result.returncode == 0, result.stderr
    assert "SERVING" in result.stdout


def test_not_serving_exits_one(health_server: tuple[str, health.HealthServicer]) -> None:
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    result = _probe(address)
    assert result.returncode == 1
    assert "NOT_SERVING" in result.stderr


def test_named_service(health_server: tuple[str, health.HealthServicer]) -> None:
    address, servicer = health_server
    servicer.set("llmserve.v1.Generation", health_pb2.HealthCheckResponse.SERVING)
    assert _probe(address, "--service", "llmserve.v1.Generation").returncode == 0
    unknown = _probe(address, "--service", "no.such.Service")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr


def test_unreachable_server_fails_within_the_timeout() -> None:
    with socket.socket() as s:  # a port nobody listens on any more
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = _probe(f"127.0.0.1:{port}", "--timeout-s", "0.5")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr or "DEADLINE_EXCEEDED" in result.stderr
