"""gRPC server start-up shared by the router and the worker: bind, health and reflection, the
address to dial. Torch-free: the router imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llmserve.grpc_limits import GrpcPortLimits
from llmserve.v1 import generation_pb2

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def dial_target(host: str, port: int) -> str:
    """``host:port`` to dial from this machine: a wildcard bind address becomes loopback."""
    return f"{'127.0.0.1' if host in _WILDCARD_HOSTS else host}:{port}"


def bind_server(
    host: str,
    port: int,
    interceptors: Sequence[grpc.aio.ServerInterceptor],
    options: Sequence[tuple[str, Any]],
    credentials: grpc.ServerCredentials | None = None,
    *,
    port_limits: GrpcPortLimits | None = None,
) -> tuple[grpc.aio.Server, int]:
    """A new server, not started yet, bound to ``host:port``, and the port it bound (``port=0``:
    a free one). Raises OSError when the address cannot be bound: ``SO_REUSEPORT`` is off, so a
    second server on a taken port fails instead of silently sharing it. ``credentials``: TLS
    (``llmserve.security.tls.ServerTls``); None serves plaintext. ``port_limits``: connections and
    handshake / idle timeouts (``llmserve.grpc_limits``; its call guard is an interceptor)."""
    limit_options = port_limits.server_options() if port_limits is not None else []
    server = grpc.aio.server(
        interceptors=list(interceptors),
        options=[*options, *limit_options, ("grpc.so_reuseport", 0)],
    )
    address = f"{host}:{port}"
    bound = (server.add_insecure_port(address) if credentials is None
             else server.add_secure_port(address, credentials))
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    return server, bound


def add_health_and_reflection(
    server: grpc.aio.Server, health_servicer: health_aio.HealthServicer, service_names: Sequence[str]
) -> None:
    """Serve ``health_servicer``, and reflection over ``service_names`` plus health and reflection."""
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
