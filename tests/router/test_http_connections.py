"""The HTTP door's connection limits (``router.frontends.http_limits``), on a real worker (tiny
model) and a real router in this event loop, driven by raw sockets as a slow or hostile client
would: headers that never end or end too late are answered 408, headers over the size limit
431, a body that stalls 408, a connection past the limit 503; each reply names its limit and
flag, is counted, closes the connection, and logs no error. Clients within the limits (a slow
but steady body, a long stream read slowly, a kept-alive connection) are served in full.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import struct
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from llmserve.fleet.redis_store import RedisStateStore
from llmserve.security.tls import TlsSettings
from router.frontends.http_limits import HttpConnectionLimits
from router.security import RouterSecurityConfig
from router.server import RouterServer
from tests.helpers.certs import CertificateAuthority
from tests.helpers.service_procs import scrape_metrics
from tests.router.inprocess import RouterStack, router_stack, start_router
from tests.router.router_procs import RedisProc

pytestmark = pytest.mark.asyncio(loop_scope="module")
MODEL = "eta"
LIMITS = HttpConnectionLimits(header_timeout_s=1.0, body_timeout_s=1.0, max_header_bytes=4096,
                              max_connections=6)
HEAD = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(module_redis: RedisProc, router_tiny_model: Path) -> AsyncIterator[RouterStack]:
    async with router_stack(module_redis.url, router_tiny_model, MODEL, http_limits=LIMITS) as stack:
        yield stack


@pytest.fixture(autouse=True)
def _no_errors_logged(caplog: pytest.LogCaptureFixture) -> Any:
    """A refused or abandoned connection is not an application error."""
    with caplog.at_level(logging.WARNING):
        yield
    errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def refusals(stack: RouterStack, limit: str) -> float:
    return stack.metric("llmserve:router_refusals_total", limit=limit)


def completion_body(**params: Any) -> bytes:
    return json.dumps({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2, **params}).encode()


def read_reply(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of the reply, read until the server closes the connection."""
    sock.settimeout(30)
    data = b""
    while more := sock.recv(65536):
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def assert_refused(reply: tuple[int, dict[str, str], bytes], status: int, limit: str, flag: str) -> None:
    got, headers, body = reply
    assert got == status, reply
    assert headers["connection"] == "close" and headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["code"] == limit and limit in error["message"] and flag in error["message"], error


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def post(port: int, body: bytes) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=60) as reply:  # noqa: S310 - loopback
        return int(reply.status)


def silent(port: int) -> tuple[int, dict[str, str], bytes]:
    with connect(port) as sock:
        return read_reply(sock)


def trickled_headers(port: int) -> tuple[tuple[int, dict[str, str], bytes], int]:
    """A header line every 0.2 s, never the blank line: (reply, header lines sent)."""
    sent = 0
    with connect(port) as sock:
        sock.sendall(HEAD)
        try:
            while sent < 100:  # 20 s: far past the deadline
                sock.sendall(b"x-slow-%d: 1\r\n" % sent)
                sent += 1
                time.sleep(0.2)
        except OSError:
            pass  # closed under us: the reply is in the receive buffer
        return read_reply(sock), sent


async def test_a_connection_that_sends_nothing_is_answered_408(stack: RouterStack) -> None:
    before = refusals(stack, "http_header_timeout_s")
    reply = await asyncio.to_thread(silent, stack.http_port)
    assert_refused(reply, 408, "http_header_timeout_s", "--http-header-timeout-s")
    assert refusals(stack, "http_header_timeout_s") == before + 1


async def test_headers_trickled_byte_by_byte_meet_one_deadline(stack: RouterStack) -> None:
    reply, sent = await asyncio.to_thread(trickled_headers, stack.http_port)
    assert_refused(reply, 408, "http_header_timeout_s", "--http-header-timeout-s")
    assert sent < 50, f"{sent} header lines taken: each line restarted the deadline"


async def test_headers_over_the_size_limit_are_answered_431(stack: RouterStack) -> None:
    def send(head: bytes) -> tuple[int, dict[str, str], bytes]:
        with connect(stack.http_port) as sock:
            try:
                sock.sendall(head)
            except OSError:
                pass
            return read_reply(sock)

    many = HEAD + b"".join(b"x-pad-%d: %s\r\n" % (i, b"a" * 100) for i in range(100)) + b"\r\n"
    one_endless_line = HEAD + b"x-pad: " + b"a" * 1_000_000
    for head in (many, one_endless_line):
        assert_refused(await asyncio.to_thread(send, head), 431, "max_http_header_bytes",
                       "--max-http-header-bytes")
    assert refusals(stack, "max_http_header_bytes") == 2
    assert await asyncio.to_thread(post, stack.http_port, completion_body()) == 200


async def test_a_stalled_body_is_answered_408_and_the_router_serves_on(stack: RouterStack) -> None:
    def stall() -> tuple[int, dict[str, str], bytes]:
        body = completion_body()
        with connect(stack.http_port) as sock:
            sock.sendall(HEAD + b"content-length: %d\r\n\r\n" % len(body) + body[:10])
            return read_reply(sock)

    assert_refused(await asyncio.to_thread(stall), 408, "http_body_timeout_s", "--http-body-timeout-s")
    assert refusals(stack, "http_body_timeout_s") == 1
    assert await asyncio.to_thread(post, stack.http_port, completion_body()) == 200


async def test_a_slow_but_steady_body_and_a_kept_alive_connection_are_served(stack: RouterStack) -> None:
    def steady() -> list[int]:
        body = completion_body()
        statuses = []
        with connect(stack.http_port) as sock:
            sock.sendall(HEAD + b"content-length: %d\r\n\r\n" % len(body))
            for i in range(0, len(body), len(body) // 5 + 1):  # six pauses of 0.4 s: 2.4 s in all
                time.sleep(0.4)
                sock.sendall(body[i:i + len(body) // 5 + 1])
            replies = Replies(sock)
            statuses.append(replies.next_status())
            sock.sendall(HEAD + b"content-length: %d\r\n\r\n" % len(body) + body)  # the same connection
            statuses.append(replies.next_status())
        return statuses

    assert await asyncio.to_thread(steady) == [200, 200]


class Replies:
    """Whole (Content-Length) replies read in order off one kept-alive connection. Replies to
    pipelined requests can share one read: what a read holds past a reply is kept for the next.
    A connection the server closes first fails the read (it never spins on EOF)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._unread = b""

    def next_status(self) -> int:
        while b"\r\n\r\n" not in self._unread:
            self._read()
        head, _, _ = self._unread.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        end = len(head) + 4 + length
        while len(self._unread) < end:
            self._read()
        self._unread = self._unread[end:]
        return int(head.split()[1])

    def _read(self) -> None:
        more = self._sock.recv(65536)
        if not more:
            raise ConnectionError(f"the server closed the connection; unread: {self._unread[:300]!r}")
        self._unread += more


async def test_a_long_stream_read_slowly_is_not_cut(stack: RouterStack) -> None:
    def stream() -> dict[str, Any]:
        body = completion_body(max_tokens=40, ignore_eos=True, stream=True,
                               stream_options={"include_usage": True})
        with connect(stack.http_port) as sock:
            sock.sendall(HEAD + b"content-length: %d\r\n\r\n" % len(body) + body)
            data = b""
            while b"data: [DONE]" not in data:
                time.sleep(0.1)  # 256 bytes per 0.1 s: the stream lasts past both timeouts
                more = sock.recv(256)
                assert more, "the stream was cut"
                data += more
        # the last event before [DONE] carries the usage (deltas a slow reader lags behind are
        # merged, so the events are fewer than the tokens)
        events = [line for line in data.split(b"\n") if line.startswith(b"data: {")]
        return dict(json.loads(events[-1][len(b"data: "):]))

    assert (await asyncio.to_thread(stream))["usage"]["completion_tokens"] == 40


async def test_connections_past_the_limit_are_answered_503(stack: RouterStack) -> None:
    def crowd() -> tuple[int, dict[str, str], bytes]:
        held = [connect(stack.http_port) for _ in range(LIMITS.max_connections)]
        try:
            time.sleep(0.2)  # all accepted
            with connect(stack.http_port) as extra:
                return read_reply(extra)
        finally:
            for sock in held:
                sock.close()

    reply = await asyncio.to_thread(crowd)
    assert_refused(reply, 503, "max_http_connections", "--max-http-connections")
    assert reply[1]["retry-after"] == "1"
    await asyncio.sleep(0.2)  # the crowd's connections closed
    assert await asyncio.to_thread(post, stack.http_port, completion_body()) == 200


async def test_a_crlf_after_a_reply_does_not_hold_the_connection(stack: RouterStack) -> None:
    """llhttp skips CRLFs between requests and any byte stops uvicorn's keep-alive timer: the
    header deadline covers them."""
    def hold() -> tuple[int, dict[str, str], bytes]:
        with connect(stack.http_port) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            assert Replies(sock).next_status() == 200
            sock.sendall(b"\r\n")
            return read_reply(sock)

    assert_refused(await asyncio.to_thread(hold), 408, "http_header_timeout_s", "--http-header-timeout-s")


async def test_endless_chunked_trailers_are_answered_431(stack: RouterStack) -> None:
    def trailers() -> tuple[int, dict[str, str], bytes]:
        body = completion_body()
        with connect(stack.http_port) as sock:
            sock.sendall(HEAD + b"transfer-encoding: chunked\r\n\r\n"
                         + b"%x\r\n%s\r\n0\r\nx-trailer: " % (len(body), body))
            try:
                for _ in range(100):  # 1 MB of one trailer line, never ended
                    sock.sendall(b"a" * 10_000)
            except OSError:
                pass
            return read_reply(sock)

    assert_refused(await asyncio.to_thread(trailers), 431, "max_http_header_bytes", "--max-http-header-bytes")


async def test_a_pipelined_request_after_a_large_body_is_served(stack: RouterStack) -> None:
    """The first request's body tail shares a read with the second's first bytes: it is not
    counted as the second's headers."""
    def pipelined() -> list[int]:
        body = completion_body()[:-1] + b" " * 20_000 + b"}"  # 20 KB > the 4 KiB header limit
        with connect(stack.http_port) as sock:
            sock.sendall(HEAD + b"content-length: %d\r\n\r\n" % len(body) + body
                         + b"GET /v1/models HTTP/1.1\r\n")
            time.sleep(0.3)
            sock.sendall(b"host: x\r\n\r\n")
            replies = Replies(sock)  # both replies can come in one read (a slow first reply)
            return [replies.next_status(), replies.next_status()]

    assert await asyncio.to_thread(pipelined) == [200, 200]


async def test_a_refusal_during_an_earlier_stream_waits_for_its_end(stack: RouterStack) -> None:
    """A pipelined request over the header limit arrives while a stream is going out: the stream
    ends whole, nothing is written inside it, then the connection closes."""
    def stream_then_refused() -> bytes:
        body = completion_body(max_tokens=30, ignore_eos=True, stream=True)
        with connect(stack.http_port) as sock:
            sock.sendall(HEAD + b"content-length: %d\r\n\r\n" % len(body) + body)
            first = sock.recv(65536)
            assert first.startswith(b"HTTP/1.1 200"), first
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nx-pad: " + b"a" * 8000 + b"\r\n\r\n")
            return first + read_reply_bytes(sock)

    data = await asyncio.to_thread(stream_then_refused)
    assert data.count(b"HTTP/1.1") == 1 and data.rstrip().endswith(b"0"), data[-200:]  # the last chunk
    assert b"data: [DONE]" in data


def read_reply_bytes(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    data = b""
    while more := sock.recv(65536):
        data += more
    return data


async def test_a_client_gone_before_its_refusal_is_not_an_error(stack: RouterStack) -> None:
    def crowd_and_leave() -> None:
        held = [connect(stack.http_port) for _ in range(LIMITS.max_connections)]
        try:
            time.sleep(0.2)
            for _ in range(20):  # connect and reset at once: the 503 meets a closed socket
                sock = connect(stack.http_port)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            time.sleep(0.3)
        finally:
            for sock in held:
                sock.close()

    await asyncio.to_thread(crowd_and_leave)  # the autouse fixture: no ERROR logged
    await asyncio.sleep(0.2)
    assert await asyncio.to_thread(post, stack.http_port, completion_body()) == 200


@dataclass(frozen=True)
class Https:
    router: RouterServer
    ca_file: Path

    @property
    def port(self) -> int:
        assert self.router.http_port is not None
        return self.router.http_port


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def https(module_redis: RedisProc, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Https]:
    """A router alone (no worker: these tests never reach one) with its door on HTTPS."""
    authority = CertificateAuthority(tmp_path_factory.mktemp("pki"), "edge")
    cert = authority.issue("router")
    store = RedisStateStore(module_redis.url)
    security = RouterSecurityConfig(tls=TlsSettings(cert=str(cert.cert), key=str(cert.key)))
    router = await start_router(store, http_port=0, metrics_port=0, http_limits=LIMITS, security=security)
    try:
        yield Https(router, authority.ca_file)
    finally:
        await router.stop(grace_s=0.5)
        await store.close()


def https_health(https: Https) -> int:
    context = ssl.create_default_context(cafile=str(https.ca_file))
    try:
        with urllib.request.urlopen(f"https://localhost:{https.port}/health", context=context,  # noqa: S310
                                    timeout=30) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_https_connections_that_never_shake_hands_meet_the_header_deadline(https: Https) -> None:
    """The handshake runs inside the header deadline and the connection count: silent TCP
    connections fill the limit (an HTTPS request is answered 503), then are closed and counted."""
    def silent_crowd() -> tuple[int, list[bytes], int]:
        crowd = [connect(https.port) for _ in range(LIMITS.max_connections)]
        try:
            time.sleep(0.2)
            crowded = https_health(https)
            closed = []
            for sock in crowd:
                sock.settimeout(30)
                try:
                    closed.append(sock.recv(1))
                except OSError:
                    closed.append(b"")
            return crowded, closed, https_health(https)
        finally:
            for sock in crowd:
                sock.close()

    crowded, closed, after = await asyncio.to_thread(silent_crowd)
    assert crowded == 503 and closed == [b""] * LIMITS.max_connections and after == 200
    metrics = scrape_metrics(https.router.metrics_port or 0)
    counted = {labels: v for (name, labels), v in metrics.items() if name == "llmserve:router_refusals_total"}
    by_limit = {dict(labels)["limit"]: v for labels, v in counted.items()}
    assert by_limit.get("http_header_timeout_s") == LIMITS.max_connections, by_limit
    assert by_limit.get("max_http_connections") == 1, by_limit
