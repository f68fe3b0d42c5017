"""``merged``: several async streams read as one; a failure or an early close cancels the rest."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from router.frontends.merged import merged


async def _counting(name: str, n: int, events: list[str], fail_at: int | None = None) -> AsyncIterator[str]:
    try:
        for i in range(n):
            if i == fail_at:
                raise ValueError(f"{name} failed")
            yield f"{name}{i}"
            await asyncio.sleep(0)
        events.append(f"{name} done")
    except asyncio.CancelledError:
        events.append(f"{name} cancelled")
        raise


async def test_every_item_of_every_source_arrives_in_each_source_order() -> None:
    events: list[str] = []
    items = [item async for item in merged([_counting("a", 5, events), _counting("b", 3, events)], buffer=1)]
    assert sorted(items) == sorted([f"a{i}" for i in range(5)] + [f"b{i}" for i in range(3)])
    assert [i for i in items if i[0] == "a"] == [f"a{i}" for i in range(5)]
    assert sorted(events) == ["a done", "b done"]


async def test_a_failure_ends_the_stream_and_cancels_the_others() -> None:
    events: list[str] = []
    never = asyncio.Event()

    async def waiting() -> AsyncIterator[str]:
        try:
            yield "w0"
            await never.wait()
        except asyncio.CancelledError:
            events.append("w cancelled")
            raise

    with pytest.raises(ValueError, match="b failed"):
        async for _ in merged([waiting(), _counting("b", 5, events, fail_at=2)]):
            pass
    assert "w cancelled" in events


async def test_closing_early_cancels_the_sources() -> None:
    events: list[str] = []
    sources = [_counting("a", 1000, events), _counting("b", 1000, events)]
    async with aclosing(merged(sources, buffer=2)) as items:
        async for item in items:
            if item == "a3":
                break
    assert sorted(events) == ["a cancelled", "b cancelled"]
