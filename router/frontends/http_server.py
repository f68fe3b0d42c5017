"""An ASGI app served by uvicorn inside the router's own asyncio loop (no thread, no process),
over httptools with the door's connection limits (:class:`GuardedHttpProtocol`).

The router binds the socket itself, so a taken port is an ``OSError`` at start (uvicorn would
exit the process) and port 0 picks a free one; uvicorn's signal handling is off (the router
owns SIGTERM / SIGINT) and so is its logging set-up (the router's ``configure_logging`` stays).
Stopping closes the listener, lets responses in flight finish for up to ``grace_s``, then
cancels what is left (which aborts their requests on the workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import ssl
from collections.abc import Callable, Iterator
from http import HTTPStatus
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from router.frontends.http_limits import HttpConnectionLimits
from router.frontends.openai_errors import error_body

log = logging.getLogger(__name__)

_HEADERS, _BODY = "headers", "body"  # what a connection is reading (None: between requests)
_LINGER_S = 2.0  # after a refusal: input read and dropped this long, so the reply is not reset away


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the door's connection limits
    (:class:`HttpConnectionLimits`); :func:`guarded_protocol` binds the limits.

    Invariants: ``_reading`` is ``"headers"`` from a connection's start, or the first byte
    after a request (a CRLF the parser skips included), to the end of a request's headers,
    ``"body"`` from there to the end of its body (trailers included), None between requests
    (uvicorn's keep-alive timeout governs that idle time) and once refused; at most one timer
    runs. A refusal writes its reply itself, tells the request's ASGI task (if any) that the
    client left, half-closes, and drops what still arrives for ``_LINGER_S`` before closing
    (closing with unread input would reset the connection, and the client could lose the
    reply); while an earlier request's reply is still going out it writes nothing, drops the
    input and closes the connection after that reply.
    """

    limits = HttpConnectionLimits()
    on_refusal: Callable[[str], None] = staticmethod(lambda limit: None)
    tls: ssl.SSLContext | None = None  # HTTPS: the handshake runs in the protocol (``_handshake``)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading: str | None = _HEADERS
        self._header_bytes = 0  # this request's: chunks read wholly inside its headers
        self._parsed_header_bytes = 0  # this request's, as the parser completes its URL and headers
        self._framing_bytes = 0  # body chunks read since the last body byte: sizes, trailers
        self._began_in_chunk = False  # a request began in the chunk being parsed
        self._body_in_chunk = 0  # body bytes of the chunk being parsed
        self._refused = False
        self._timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        self._handshake_task: asyncio.Task[None] | None = None  # held: the loop keeps tasks weakly
        self._early: list[bytes] = []  # HTTPS: bytes decrypted right after the handshake, before _start

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.tls is None:
            self._start(transport, self.loop.time())
            return
        # HTTPS: the TLS handshake is done here (asyncio's STARTTLS), so a connection counts
        # towards --max-http-connections and its header deadline runs from the first byte, not
        # from the end of a handshake a silent client never starts.
        self.connections.add(self)
        self.transport = transport  # uvicorn's shutdown() closes it meanwhile
        transport.pause_reading()  # no byte reaches the HTTP parser before TLS is on
        self._handshake_task = self.loop.create_task(self._handshake(transport, self.tls))

    async def _handshake(self, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
        started = self.loop.time()
        try:
            transport = await self.loop.start_tls(raw, self, context, server_side=True,
                                                  ssl_handshake_timeout=self.limits.header_timeout_s)
        except Exception as exc:  # noqa: BLE001 - the client's doing: a timeout, a bad hello, a reset
            self.connections.discard(self)
            raw.close()
            if isinstance(exc, (TimeoutError, ConnectionAbortedError)):  # asyncio's handshake timeout
                self.on_refusal("http_header_timeout_s")
            return
        if transport is None:  # the loop closed meanwhile
            self.connections.discard(self)
            return
        self._start(transport, started)  # type: ignore[arg-type]

    def _start(self, transport: asyncio.Transport, started: float) -> None:
        super().connection_made(transport)
        limit = self.limits.max_connections
        if len(self.connections) > limit:
            self._refuse(503, "max_http_connections",
                         f"the router holds at most {limit} HTTP connections (max_http_connections, flag "
                         f"--max-http-connections); try again shortly", retry_after_s=1)
            return
        self._arm(max(0.0, started + self.limits.header_timeout_s - self.loop.time()))
        if self._early:
            early, self._early = b"".join(self._early), []
            self.data_received(early)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._reading = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # dropped
        if self.flow is None:  # HTTPS: the handshake is done but _start has not run yet
            self._early.append(data)  # one TLS read (a record or two), replayed by _start
            return
        self._last_read = self.loop.time()
        if self._reading is None:
            # The next request's deadline starts with the first byte after the last one, even
            # when the parser starts no message (llhttp skips CRLFs between requests, and any
            # byte stops uvicorn's keep-alive timer: a CRLF now and then held a connection).
            self._reading = _HEADERS
            self._header_bytes = self._parsed_header_bytes = 0
            self._arm(self.limits.header_timeout_s)
        self._began_in_chunk = False
        self._body_in_chunk = 0
        super().data_received(data)
        if self._refused:
            return
        # httptools holds an unfinished header (or trailer) line whole, so what the parser has
        # not completed is bounded by the bytes read: a chunk read wholly inside the headers
        # counts in full (one in which the request began may hold the previous one's body, and
        # is bounded by the read size), as does a body chunk that held no body byte.
        if self._reading == _HEADERS and not self._began_in_chunk:
            self._header_bytes += len(data)
        elif self._reading == _BODY:
            self._framing_bytes = 0 if self._body_in_chunk else self._framing_bytes + len(data)
        if max(self._header_bytes, self._framing_bytes) > self.limits.max_header_bytes:
            self._refuse_header_size()

    # Parser callbacks, inside super().data_received. After a refusal the parser runs to the
    # end of its chunk with every callback a no-op: no request starts, nothing is kept.
    def on_message_begin(self) -> None:
        if self._refused:
            return
        super().on_message_begin()
        self._began_in_chunk = True
        self._header_bytes = self._parsed_header_bytes = 0
        if self._reading != _HEADERS:  # a kept-alive connection's next request: its own deadline
            self._reading = _HEADERS
            self._arm(self.limits.header_timeout_s)

    def on_url(self, url: bytes) -> None:
        if not self._count_header(len(url)):
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._count_header(len(name) + len(value) + 4):  # ": " and CRLF
            super().on_header(name, value)

    def _count_header(self, size: int) -> bool:
        """Count what the parser completed (headers that arrive whole in one chunk); True when
        the request is refused."""
        if not self._refused:
            self._parsed_header_bytes += size
            if self._parsed_header_bytes > self.limits.max_header_bytes:
                self._refuse_header_size()
        return self._refused

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._reading = _BODY
        self._framing_bytes = 0
        self._arm(self.limits.body_timeout_s)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            self._body_in_chunk += len(body)
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._reading = None
        self._disarm()
        super().on_message_complete()

    # timers
    def _arm(self, delay_s: float, callback: Callable[[], None] | None = None) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay_s, callback or self._on_timer)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._reading == _HEADERS:
            self._time_out("http_header_timeout_s", "--http-header-timeout-s", self.limits.header_timeout_s,
                           "the request's headers did not arrive within")
        elif self._reading == _BODY:
            timeout = self.limits.body_timeout_s
            now = self.loop.time()
            if self.flow.read_paused:  # the router paused reading (its reader is behind): not the client
                self._last_read = now
            idle = now - self._last_read
            if idle < timeout:
                self._arm(timeout - idle)
                return
            self._time_out("http_body_timeout_s", "--http-body-timeout-s", timeout,
                           "the request body paused for longer than")

    def _time_out(self, limit: str, flag: str, seconds: float, what: str) -> None:
        cycle = self.cycle
        if self._reading == _BODY and cycle is not None and cycle.response_started:
            # answered before its body was read (a 413, a GET): the client has its reply, so
            # nothing is counted; the connection ends after it
            self._reading = None
            if cycle.response_complete:
                self.transport.close()
            else:
                cycle.keep_alive = False
            return
        self._refuse(408, limit, f"{what} {seconds:g} s ({limit}, flag {flag})")

    # refusals
    def _refuse_header_size(self) -> None:
        self._refuse(431, "max_http_header_bytes",
                     f"the request line and headers (or a chunked body's framing and trailers) are larger "
                     f"than {self.limits.max_header_bytes} bytes (max_http_header_bytes, flag "
                     "--max-http-header-bytes)")

    def _refuse(self, status: int, limit: str, message: str, retry_after_s: int | None = None) -> None:
        """Answer ``status`` with OpenAI's error JSON naming the limit, count it, and close."""
        if self._refused:
            return
        own = self._reading == _BODY  # the cycle is the refused request's own (else an earlier one's)
        self._refused = True
        self._reading = None
        self.on_refusal(limit)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not own:
            # an earlier request is still being answered (pipelining): a reply now would land
            # in or before its reply, so this one gets none; the connection closes after it
            self._disarm()
            cycle.keep_alive = False
            return
        kind = "server_error" if status == 503 else "invalid_request_error"
        body = json.dumps(error_body(message, kind, None, limit)).encode()
        head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
                f"content-length: {len(body)}", "connection: close"]
        if retry_after_s is not None:
            head.append(f"retry-after: {retry_after_s}")
        self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body)
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # its ASGI task reads a disconnect and sends nothing more
            cycle.message_event.set()
        self._disarm()
        try:
            if self.transport.can_write_eof():  # TLS cannot half-close: it closes at once
                self.transport.write_eof()
                self.flow.resume_reading()
                self._arm(_LINGER_S, self.transport.close)
                return
        except OSError:  # the client has gone already
            pass
        self.transport.close()


def guarded_protocol(limits: HttpConnectionLimits, on_refusal: Callable[[str], None],
                     tls: ssl.SSLContext | None = None) -> type[GuardedHttpProtocol]:
    """:class:`GuardedHttpProtocol` bound to ``limits``; ``on_refusal(limit)`` counts a refusal;
    ``tls``: serve HTTPS with it."""

    class Bound(GuardedHttpProtocol):
        pass

    Bound.limits = limits
    Bound.on_refusal = staticmethod(on_refusal)  # type: ignore[method-assign, assignment]
    Bound.tls = tls
    return Bound


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the router's own drain them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (OSError when taken)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restarts past TIME_WAIT
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class HttpServer:
    """Serves ``app`` on ``host:port`` in the running loop until :meth:`stop`."""

    def __init__(self, app: Any, host: str, port: int, grace_s: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None,
                 limits: HttpConnectionLimits = HttpConnectionLimits(),
                 on_refusal: Callable[[str], None] = lambda limit: None) -> None:
        """``ssl_context``: serve HTTPS with it (``llmserve.security.tls.HttpTls``); ``limits``:
        the connections' (:class:`GuardedHttpProtocol`), ``on_refusal(limit)`` counts a refusal."""
        self._host = host
        self._requested_port = port
        self._config = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", ws="none",
            timeout_graceful_shutdown=_whole_seconds(grace_s), server_header=False,
            http=guarded_protocol(limits, on_refusal, ssl_context),  # TLS in the protocol, not uvicorn
        )
        self._server = _EmbeddedServer(self._config)
        self._task: asyncio.Task[None] | None = None
        self._port = 0

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        return self._port

    async def start(self) -> None:
        sock = bind_socket(self._host, self._requested_port)
        self._port = int(sock.getsockname()[1])
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # uvicorn failed to start: raise its error
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)
        log.info("HTTP (OpenAI API) listening on %s:%d", self._host, self._port)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting connections; responses in flight get ``grace_s`` to finish."""
        if self._task is None:
            return
        if grace_s is not None:
            self._config.timeout_graceful_shutdown = _whole_seconds(grace_s)
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None


def _whole_seconds(grace_s: float) -> int:
    """uvicorn's graceful-shutdown timeout is whole seconds: round up, at least one."""
    return max(1, math.ceil(grace_s))
