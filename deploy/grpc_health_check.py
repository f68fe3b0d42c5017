#!/usr/bin/env python3
"""Probe a gRPC server through the standard ``grpc.health.v1.Health/Check`` call.

Exit status 0 when the server answers SERVING, 1 otherwise (NOT_SERVING, unknown service,
unreachable, timeout). The images install it as ``llmserve-healthcheck`` for Compose health
checks; Kubernetes uses its native ``grpc:`` probes instead and needs no binary.
``grpc_health_probe`` is a Go binary that cannot be installed from a package registry, while
``grpcio`` and ``grpcio-health-checking`` are base dependencies of llmserve, so this script
adds nothing to either image.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llmserve-healthcheck",
        description="Exit 0 if the gRPC server at ADDRESS reports SERVING through grpc.health.v1.",
    )
    parser.add_argument("address", nargs="?", default="127.0.0.1:50051", help="host:port to probe")
    parser.add_argument("--service", default="", help="health service name ('' = the whole server)")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="deadline of the Check call")
    return parser.parse_args(argv)


def check(address: str, service: str, timeout_s: float) -> tuple[bool, str]:
    """(serving?, what to print) for one Check call."""
    # The probe always targets a local or in-cluster address: never route it through a proxy.
    with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return False, f"{address}: {exc.code().name}: {exc.details()}"
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{address}: {name}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    serving, message = check(args.address, args.service, args.timeout_s)
    print(message, file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
