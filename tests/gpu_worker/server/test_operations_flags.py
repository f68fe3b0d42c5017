"""The worker's operations flags (warm standby, device cost) and its gRPC port's limits: parsed
from flags and LLMSERVE_* variables, validated, and refused where they cannot work (a standby
without a fleet)."""

from __future__ import annotations

import pytest

from gpu_worker.__main__ import build_parser, configs_from_args
from gpu_worker.config import EngineConfig
from gpu_worker.server import ServerConfig, WorkerServer
from llmserve.grpc_limits import WORKER_PORT_LIMITS, GrpcPortLimits


def test_flags_and_variables_reach_the_server_config() -> None:
    args = build_parser({"LLMSERVE_DEVICE_COST_PER_HOUR": "2.69", "LLMSERVE_STANDBY": "true"}).parse_args(
        ["--model", "m", "--redis-url", "redis://r:6379/0", "--standby-min-live", "2",
         "--standby-queue-threshold", "4.5"])
    _, server = configs_from_args(args)
    assert (server.standby, server.standby_min_live, server.standby_queue_threshold) == (True, 2, 4.5)
    assert server.device_cost_per_hour == 2.69
    _, plain = configs_from_args(build_parser({}).parse_args(["--model", "m"]))
    assert (plain.standby, plain.standby_queue_threshold, plain.device_cost_per_hour) == (False, None, 0.0)


def test_a_standby_needs_a_fleet_to_watch() -> None:
    args = build_parser({}).parse_args(["--model", "m", "--standby"])
    with pytest.raises(ValueError, match="--standby needs --redis-url"):
        configs_from_args(args)
    with pytest.raises(ValueError, match="standby worker needs a fleet"):
        WorkerServer(EngineConfig(model="m"), ServerConfig(standby=True))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("standby_min_live", 0, "standby_min_live must be >= 1"),
    ("standby_queue_threshold", 0.0, "standby_queue_threshold must be > 0"),
    ("device_cost_per_hour", -1.0, "device_cost_per_hour must be >= 0"),
])
def test_invalid_values_are_refused_naming_the_setting(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerConfig(**{field: value})  # type: ignore[arg-type]


def test_grpc_port_flags_reach_the_server_config() -> None:
    args = build_parser({"LLMSERVE_MAX_GRPC_CONNECTIONS": "32"}).parse_args(
        ["--model", "m", "--grpc-handshake-timeout-s", "3", "--grpc-max-connection-idle-s", "900",
         "--grpc-request-timeout-s", "7", "--max-concurrent-rpcs", "100"])
    _, server = configs_from_args(args)
    assert server.grpc_limits == GrpcPortLimits(max_connections=32, handshake_timeout_s=3.0,
                                                max_connection_idle_s=900.0, request_timeout_s=7.0)
    assert server.max_concurrent_rpcs == 100
    _, plain = configs_from_args(build_parser({}).parse_args(["--model", "m"]))
    # Routers hold their channels to a worker open on purpose: a worker never closes idle ones.
    assert (plain.grpc_limits, plain.max_concurrent_rpcs) == (WORKER_PORT_LIMITS, 2048)
    assert (WORKER_PORT_LIMITS.max_connections, WORKER_PORT_LIMITS.max_connection_idle_s) == (1024, 0.0)
    assert ("grpc.max_connection_idle_ms", 0) not in WORKER_PORT_LIMITS.server_options()
