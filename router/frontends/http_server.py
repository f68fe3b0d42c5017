"""An ASGI app served by uvicorn inside the router's own asyncio loop (no thread, no process).

The router binds the socket itself, so a taken port is an ``OSError`` at start (uvicorn would
exit the process) and port 0 picks a free one; uvicorn's signal handling is off (the router
owns SIGTERM / SIGINT) and so is its logging set-up (the router's ``configure_logging`` stays).
Stopping closes the listener, lets responses in flight finish for up to ``grace_s``, then
cancels what is left (which aborts their requests on the workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import uvicorn

log = logging.getLogger(__name__)


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
                 ssl_context: ssl.SSLContext | None = None) -> None:
        """``ssl_context``: serve HTTPS with it (``llmserve.security.tls.HttpTls``)."""
        self._host = host
        self._requested_port = port
        self._config = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", ws="none",
            timeout_graceful_shutdown=_whole_seconds(grace_s), server_header=False,
        )
        if ssl_context is not None:
            self._config.load()
            self._config.ssl = ssl_context  # uvicorn hands it to loop.create_server
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
