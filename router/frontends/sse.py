"""An ASGI response that is either one JSON reply or a server-sent-event stream, decided by the
first thing its event source yields, and cancelled when the client goes away.

The OpenAI door's handlers are async generators: they yield a :class:`Reply` (a whole JSON
response: a non-streaming result or an error, whatever its status) or, for a stream, SSE event
bytes. The status of a streamed response is decided only when its first event exists, so a
request that fails before its first token (unknown model, no worker, a refused parameter) still
gets its own HTTP status rather than a 200 stream carrying an error.

The source runs in one task from start to end (its spans attach and detach in one context),
next to a watcher of ``http.disconnect``: when the client disconnects first, the source is
cancelled, which cancels the router's call to the worker, which aborts the request there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies must not buffer the stream
]


@dataclass(frozen=True)
class Reply:
    """A whole response, JSON unless ``content_type`` says otherwise (``headers``: extra ones,
    e.g. ``Retry-After``)."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = "application/json"


EventSource = AsyncGenerator["Reply | bytes", None]


class ReplyOrStream(Response):
    """Sends its source's first item as a JSON reply, or its items as an SSE stream."""

    def __init__(self, source: EventSource) -> None:
        super().__init__()
        self._source = source

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sender = asyncio.ensure_future(self._send(send))
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not sender.done():
                sender.cancel()  # the client is gone (or this task is being cancelled)
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _send(self, send: Send) -> None:
        async with aclosing(self._source) as items:
            first = await anext(items, None)
            if first is None:
                raise RuntimeError("the event source yielded nothing")
            if isinstance(first, Reply):
                headers = [(b"content-type", first.content_type.encode("latin-1")),
                           (b"content-length", str(len(first.body)).encode()),
                           *((k.encode("latin-1"), v.encode("latin-1")) for k, v in first.headers)]
                await send({"type": "http.response.start", "status": first.status, "headers": headers})
                await send({"type": "http.response.body", "body": first.body})
                return
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            await send({"type": "http.response.body", "body": first, "more_body": True})
            async for item in items:
                if isinstance(item, Reply):
                    raise RuntimeError("a Reply after the stream started")
                await send({"type": "http.response.body", "body": item, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _wait_disconnect(receive: Receive) -> None:
    """Return when the client disconnects (the request body has been read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
