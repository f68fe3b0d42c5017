"""TLS and mutual TLS on real gRPC servers on loopback, with certificates made in the test:
wrong CA, expired certificate, client certificate from another CA, no client certificate,
certificate rotation without restart (server and client side), and WorkerControl access."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmserve.grpc_server import bind_server
from llmserve.security.control import ControlAccessInterceptor
from llmserve.security.tls import ClientTls, HttpTls, ServerTls, peer_is_loopback
from llmserve.v1 import internal_pb2 as ipb
from llmserve.v1 import internal_pb2_grpc as ipb_grpc
from router.dispatch import ChannelPool
from tests.helpers.certs import CertFiles, CertificateAuthority
from tests.helpers.network import non_loopback_address

Serve = Callable[..., Awaitable[int]]


class Control(ipb_grpc.WorkerControlServicer):
    """Answers GetWorkerInfo: enough to tell a refused call from a served one."""

    async def GetWorkerInfo(self, request: ipb.GetWorkerInfoRequest,  # noqa: N802
                            context: grpc.aio.ServicerContext) -> ipb.WorkerInfo:
        return ipb.WorkerInfo(worker_id="w1")


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """``await serve(tls, host=...)``: a server with health and WorkerControl; returns its port."""
    servers: list[grpc.aio.Server] = []

    async def start(tls: ServerTls | None, host: str = "127.0.0.1", allow_remote: bool = False) -> int:
        server, port = bind_server(host, 0, [ControlAccessInterceptor(allow_remote)], [],
                                   tls.credentials() if tls is not None else None)
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        ipb_grpc.add_WorkerControlServicer_to_server(Control(), server)
        await server.start()
        servers.append(server)
        return port

    yield start
    for server in servers:
        await server.stop(None)


@pytest.fixture
def fleet(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "fleet", "fleet")


@pytest.fixture
def other(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "other", "other")


async def check(port: int, ca: Path | None, client: CertFiles | None = None, host: str = "127.0.0.1"
                ) -> grpc.StatusCode:
    """Health Check over a fresh channel: OK or the status the client saw."""
    target = f"{host}:{port}"
    if ca is None:
        channel = grpc.aio.insecure_channel(target)
    else:
        creds = grpc.ssl_channel_credentials(ca.read_bytes(), client.key_pem() if client else None,
                                             client.cert_pem() if client else None)
        channel = grpc.aio.secure_channel(target, creds)
    async with channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_tls_server_refuses_clients_trusting_another_ca(serve: Serve, fleet: CertificateAuthority,
                                                               other: CertificateAuthority) -> None:
    server = fleet.issue("server")
    port = await serve(ServerTls(server.cert, server.key))
    assert await check(port, fleet.ca_file) == grpc.StatusCode.OK
    assert await check(port, other.ca_file) == grpc.StatusCode.UNAVAILABLE  # wrong CA: handshake fails
    assert await check(port, None) == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port


async def test_an_expired_server_certificate_is_refused(serve: Serve, fleet: CertificateAuthority) -> None:
    expired = fleet.issue("expired", expired=True)
    port = await serve(ServerTls(expired.cert, expired.key))
    assert await check(port, fleet.ca_file) == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_accepts_only_client_certificates_of_the_fleet_ca(
    serve: Serve, fleet: CertificateAuthority, other: CertificateAuthority
) -> None:
    server = fleet.issue("worker")
    port = await serve(ServerTls(server.cert, server.key, client_ca=fleet.ca_file))
    assert await check(port, fleet.ca_file, fleet.issue("router")) == grpc.StatusCode.OK
    assert await check(port, fleet.ca_file, other.issue("intruder")) == grpc.StatusCode.UNAVAILABLE
    assert await check(port, fleet.ca_file) == grpc.StatusCode.UNAVAILABLE  # no client certificate
    assert await check(port, fleet.ca_file, fleet.issue("old", expired=True)) == grpc.StatusCode.UNAVAILABLE


async def test_replaced_certificate_files_are_served_to_new_connections_without_restart(
    serve: Serve, fleet: CertificateAuthority, other: CertificateAuthority
) -> None:
    server = fleet.issue("server")
    port = await serve(ServerTls(server.cert, server.key, min_interval_s=0))
    assert await check(port, fleet.ca_file) == grpc.StatusCode.OK
    assert await check(port, other.ca_file) == grpc.StatusCode.UNAVAILABLE
    rotated = other.issue("server")  # a certificate of the other CA, written over the served files
    rotated.cert.replace(server.cert)
    rotated.key.replace(server.key)
    assert await check(port, other.ca_file) == grpc.StatusCode.OK, "new connections get the new certificate"
    assert await check(port, fleet.ca_file) == grpc.StatusCode.UNAVAILABLE


async def test_the_router_redials_workers_when_its_client_certificate_changes(
    serve: Serve, fleet: CertificateAuthority, other: CertificateAuthority
) -> None:
    worker = fleet.issue("worker")
    port = await serve(ServerTls(worker.cert, worker.key, client_ca=fleet.ca_file))
    client = other.issue("router")  # not the fleet's: refused at the handshake
    pool = ChannelPool(tls=ClientTls(fleet.ca_file, client.cert, client.key, min_interval_s=0))
    target = f"127.0.0.1:{port}"
    try:
        stub = health_pb2_grpc.HealthStub(pool.get(target))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        renewed = fleet.issue("router-renewed")
        renewed.cert.replace(client.cert)
        renewed.key.replace(client.key)
        reply = await health_pb2_grpc.HealthStub(pool.get(target)).Check(health_pb2.HealthCheckRequest(),
                                                                         timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await pool.close()


async def control_call(port: int, host: str, ca: Path | None = None, client: CertFiles | None = None
                       ) -> grpc.StatusCode:
    target = f"{host}:{port}"
    if ca is None:
        channel = grpc.aio.insecure_channel(target)
    else:
        creds = grpc.ssl_channel_credentials(ca.read_bytes(), client.key_pem() if client else None,
                                             client.cert_pem() if client else None)
        options = [("grpc.ssl_target_name_override", "localhost")]
        channel = grpc.aio.secure_channel(target, creds, options=options)
    async with channel:
        try:
            await ipb_grpc.WorkerControlStub(channel).GetWorkerInfo(ipb.GetWorkerInfoRequest(), timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_worker_control_only_for_mtls_routers_and_local_callers(
    serve: Serve, fleet: CertificateAuthority
) -> None:
    remote = non_loopback_address()
    plain = await serve(None, host="0.0.0.0")
    assert await control_call(plain, "127.0.0.1") == grpc.StatusCode.OK  # the pod's own drain hook
    assert await control_call(plain, remote) == grpc.StatusCode.UNAUTHENTICATED
    assert await check(plain, None, host=remote) == grpc.StatusCode.OK, "health stays open"
    opened = await serve(None, host="0.0.0.0", allow_remote=True)
    assert await control_call(opened, remote) == grpc.StatusCode.OK  # --allow-remote-control
    worker = fleet.issue("worker")
    mtls = await serve(ServerTls(worker.cert, worker.key, client_ca=fleet.ca_file), host="0.0.0.0")
    assert await control_call(mtls, remote, fleet.ca_file, fleet.issue("router")) == grpc.StatusCode.OK


def test_loopback_peers() -> None:
    for peer in ("ipv4:127.0.0.1:5000", "ipv4:127.3.2.1:1", "ipv6:[::1]:5000", "ipv6:[::ffff:127.0.0.1]:80",
                 "unix:/tmp/x.sock"):
        assert peer_is_loopback(peer), peer
    for peer in ("ipv4:10.0.0.1:5000", "ipv6:[fd00::2]:5000", "ipv6:[::ffff:10.0.0.1]:80", "garbage"):
        assert not peer_is_loopback(peer), peer


async def _https_handshake(port: int, ca: Path) -> bool:
    """Whether a TLS client trusting only ``ca`` completes a handshake with the server."""
    context = ssl.create_default_context(cafile=str(ca))
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
    except ssl.SSLError:
        return False
    writer.close()
    with contextlib.suppress(ssl.SSLError, ConnectionError):
        await writer.wait_closed()
    return True


async def test_the_http_door_certificate_is_reloaded_too(fleet: CertificateAuthority,
                                                          other: CertificateAuthority) -> None:
    files = fleet.issue("edge")
    tls = HttpTls(files.cert, files.key, min_interval_s=0)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=tls.context)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await _https_handshake(port, fleet.ca_file)
        assert not await _https_handshake(port, other.ca_file)
        rotated = other.issue("edge-next")
        rotated.cert.replace(files.cert)
        rotated.key.replace(files.key)
        assert await _https_handshake(port, other.ca_file), "new connections get the new certificate"
        assert not await _https_handshake(port, fleet.ca_file)
    finally:
        server.close()
        await server.wait_closed()
