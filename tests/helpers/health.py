"""Waiting for a server process to report SERVING on ``grpc.health.v1`` (shared by test helpers)."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def wait_until_serving(target: str, check_alive: Callable[[], None], timeout_s: float) -> bool:
    """Poll the overall health of ``target`` until SERVING (True) or ``timeout_s`` passes (False).

    ``check_alive`` runs before every poll and raises when the server process has died, so a
    crash fails at once instead of after the timeout.
    """
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            check_alive()
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    return False
