"""Several async streams read as one, each in a task of its own (a completions batch: one router
request per prompt, rendered as one response)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import TypeVar

T = TypeVar("T")

_END = object()  # a source finished


async def merged(sources: Sequence[AsyncIterator[T]], buffer: int = 4) -> AsyncGenerator[T, None]:
    """The items of every source in the order they arrive.

    Each source runs in its own task, which copies the caller's context, so what a source opens
    (its spans, its request observation) is its own. At most ``buffer`` times the number of
    sources items wait to be read (sources blocked on a full queue resume in turn): a slow
    reader slows the sources rather than the items piling up. The first source to
    fail ends the stream with its exception; closing or cancelling the stream, or a failure,
    cancels the sources still running and waits for them to end.
    """
    queue: asyncio.Queue[tuple[object, BaseException | None]] = asyncio.Queue(buffer * max(1, len(sources)))

    async def pump(source: AsyncIterator[T]) -> None:
        try:
            async for item in source:
                await queue.put((item, None))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
            await queue.put((_END, exc))
            return
        await queue.put((_END, None))

    tasks = [asyncio.ensure_future(pump(source)) for source in sources]
    try:
        running = len(tasks)
        while running:
            item, error = await queue.get()
            if error is not None:
                raise error
            if item is _END:
                running -= 1
                continue
            yield item  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
