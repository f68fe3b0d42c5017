"""Clients that stall a gRPC server the cheap ways: a connection that never handshakes or never
calls, and a call whose request message never arrives."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc


async def closed_by_server(reader: asyncio.StreamReader, within_s: float = 10.0) -> bool:
    """Whether the server closes the connection within ``within_s`` (what it sends is skipped)."""
    try:
        async with asyncio.timeout(within_s):
            while await reader.read(65536):
                pass
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


async def silent_connection(port: int, first: bytes = b""
                            ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to ``port`` on loopback that has sent ``first`` (nothing: not even the
    HTTP/2 preface) and will send nothing more."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if first:
        writer.write(first)
        await writer.drain()
    return reader, writer


async def silent_connection_closed(port: int, first: bytes = b"", within_s: float = 10.0) -> bool:
    """Whether the server closes a :func:`silent_connection` within ``within_s``."""
    reader, writer = await silent_connection(port, first)
    try:
        return await closed_by_server(reader, within_s)
    finally:
        writer.close()


async def _never_sends() -> AsyncIterator[bytes]:
    await asyncio.Event().wait()
    yield b""  # pragma: no cover


def half_open(channel: grpc.aio.Channel, method: str) -> Any:
    """A call of a unary-request ``method`` whose request never arrives: a stream-request call on
    the wire, headers only, which the server cannot tell from a slow client."""
    return channel.stream_stream(method)(_never_sends())
