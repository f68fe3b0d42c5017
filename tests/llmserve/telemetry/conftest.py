"""Fixtures of the telemetry tests (the servers themselves live in telemetry_stack.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.llmserve.telemetry.telemetry_stack import Stack, start_stack


@pytest.fixture
async def stack(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    """Client -> router-like -> worker-like, all traced into one in-memory exporter."""
    for var in ("OTEL_SERVICE_NAME", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    async for running in start_stack():
        yield running
