"""The fleet store over an authenticated, encrypted Redis: a real redis-server with only a TLS
port, client certificates required, the default user off and an ACL user limited to the
``llmserve:*`` keys (the set-up docs/SECURITY.md recommends), certificates made in the test."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmserve.fleet import LoadReport, WorkerRecord
from llmserve.fleet.redis_store import RedisStateStore, RedisTls
from llmserve.fleet.store import StoreUnavailable
from tests.helpers.certs import CertFiles, CertificateAuthority
from tests.helpers.redis_server import free_port

PASSWORD = "s3cret-fleet-password"
# What the fleet's components run: strings, sets, expiry, pipelines (MULTI/EXEC), ping, and the
# connection set-up commands of redis-py; nothing outside llmserve:*.
ACL = ["llmserve", "on", f">{PASSWORD}", "~llmserve:*", "+@connection", "+@string", "+@set", "+@keyspace",
       "+@transaction", "-@dangerous", "+pexpire", "+del"]


@dataclass
class TlsRedis:
    port: int
    ca: CertificateAuthority
    client: CertFiles

    def url(self, user: str = "llmserve", password: str = PASSWORD, scheme: str = "rediss") -> str:
        return f"{scheme}://{user}:{password}@localhost:{self.port}/0"

    def tls(self, client: CertFiles | None = None, ca: Path | None = None) -> RedisTls:
        cert = client or self.client
        return RedisTls(ca_file=str(ca or self.ca.ca_file), cert_file=str(cert.cert), key_file=str(cert.key))


def _wait_tls(port: int, ca: CertificateAuthority, client: CertFiles) -> None:
    context = ssl.create_default_context(cafile=str(ca.ca_file))
    context.load_cert_chain(str(client.cert), str(client.key))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw, \
                    context.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(b"PING\r\n")
                if s.recv(64):  # -NOAUTH or +PONG: the server answers
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server (TLS) did not start")


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    exe = shutil.which("redis-server")
    assert exe is not None, "redis-server is not installed"
    ca = CertificateAuthority(tmp_path / "pki", "redis-ca")
    server, client = ca.issue("redis"), ca.issue("worker")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path), "--tls-cert-file", str(server.cert),
         "--tls-key-file", str(server.key), "--tls-ca-cert-file", str(ca.ca_file),
         "--tls-auth-clients", "yes",
         "--user", "default", "off", "--user", *ACL],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_tls(port, ca, client)
        yield TlsRedis(port, ca, client)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def record(wid: str) -> WorkerRecord:
    return WorkerRecord(wid, "m", "127.0.0.1:1", 16, 2048, LoadReport(max_num_seqs=4),
                        heartbeat_at=time.time())


async def test_an_acl_user_over_tls_with_a_client_certificate_runs_the_fleet(tls_redis: TlsRedis) -> None:
    store = RedisStateStore(tls_redis.url(), tls=tls_redis.tls())
    try:
        assert await store.heartbeat(record("w1"), ttl_s=5) is False
        await store.replace_kv("w1", [b"h" * 16], ttl_s=5)
        assert await store.heartbeat(record("w1"), ttl_s=5) is True
        view = await store.read_fleet()
        assert [w.worker_id for w in view.workers] == ["w1"] and view.epoch
        assert await store.match_prefixes({"w1": [b"h" * 16]}) == {"w1": 1}
        await store.remove_worker("w1")
    finally:
        await store.close()


@pytest.mark.parametrize("why", ["wrong password", "default user", "plaintext", "wrong CA", "foreign client"])
async def test_what_redis_refuses(tls_redis: TlsRedis, why: str) -> None:
    other = CertificateAuthority(tls_redis.ca.folder.parent / "other", "other")
    url, tls = tls_redis.url(), tls_redis.tls()
    if why == "wrong password":
        url = tls_redis.url(password="guess")
    elif why == "default user":
        url = f"rediss://localhost:{tls_redis.port}/0"
    elif why == "plaintext":
        url, tls = tls_redis.url(scheme="redis"), RedisTls()
    elif why == "wrong CA":
        tls = tls_redis.tls(ca=other.ca_file)
    else:
        tls = tls_redis.tls(client=other.issue("intruder"))
    store = RedisStateStore(url, tls=tls)
    try:
        with pytest.raises(StoreUnavailable):
            await store.heartbeat(record("w1"), ttl_s=5)
    finally:
        await store.close()


def test_tls_files_need_a_rediss_url() -> None:
    with pytest.raises(ValueError):
        RedisTls(ca_file="/etc/ssl/ca.pem").connection_kwargs("redis://localhost:6379/0")
    assert RedisTls().connection_kwargs("redis://localhost:6379/0") == {}
    assert RedisTls(ca_file="ca.pem").connection_kwargs("rediss://h:6380/0")["ssl_ca_certs"] == "ca.pem"
