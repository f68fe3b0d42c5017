"""The chaos and load suite at CI size (issue 17, item 5): every scenario on the suite's one fleet
of real processes on loopback (``conftest.py``: Redis, 3 workers, 2 routers), in order; every
stream checked against a single-request rerun (docs/RELIABILITY.md has the figures;
``bench/chaos.py`` runs the same scenarios at full size, each on its own fleet).

Sizes keep the module to a few minutes on a 2-core runner: the load is the issue's 1,000
concurrent streams (8 tokens each, 100 distinct prompts so the reruns stay short); the fault
scenarios run 60-120 streams of 8-24 tokens, so a fault always lands mid-stream. The SIGKILL
scenario runs last: it leaves the fleet one worker short."""

from __future__ import annotations

import pytest

from tests.chaos import scenarios
from tests.chaos.harness import Figures, Fleet

pytestmark = [pytest.mark.asyncio(loop_scope="function"), pytest.mark.chaos]


def _no_loss(figures: Figures) -> None:
    assert figures.failed == 0 and figures.crossed == 0, figures
    assert figures.completed == figures.sent, figures


async def test_1000_concurrent_streams_through_two_routers(chaos_fleet: Fleet) -> None:
    await chaos_fleet.check_ready()
    figures = await scenarios.load(chaos_fleet, streams=1000, distinct=100, max_tokens=8)
    _no_loss(figures)
    await chaos_fleet.check_ready()


@pytest.mark.parametrize("persistence", [True, False], ids=["with persistence", "without persistence"])
async def test_redis_killed_and_restarted_under_load(chaos_fleet: Fleet, persistence: bool) -> None:
    """Finding 7 under load: a restart that lost the data changes the store's epoch and every
    router sees it; one that kept its data (append-only file) changes nothing."""
    await chaos_fleet.check_ready()
    outcome = await scenarios.redis_restart(chaos_fleet, persistence=persistence, waves=3, per_wave=40,
                                            max_tokens=8)
    _no_loss(outcome.figures)
    if persistence:
        assert not outcome.epoch_changed and outcome.resets_seen == [0, 0], outcome
    else:
        assert outcome.epoch_changed and all(n >= 1 for n in outcome.resets_seen), outcome
    await chaos_fleet.check_ready()


async def test_frozen_worker_opens_its_breaker_and_no_stream_outlives_its_deadline(
    chaos_fleet: Fleet,
) -> None:
    await chaos_fleet.check_ready()
    outcome = await scenarios.worker_sigstop(chaos_fleet, "w0", streams=60, max_tokens=16, deadline_s=60,
                                             short_streams=10, short_deadline_s=1.0)
    assert outcome.breaker_opened, "no router opened the frozen worker's breaker"
    assert outcome.overran_deadline == 0
    figures = outcome.figures
    # Only short-deadline streams may fail, and only by their deadline; the others all move in time.
    assert outcome.unexpected_failures == 0 and figures.crossed == 0, figures
    assert figures.failed == figures.deadline_expired and figures.completed == figures.sent - figures.failed
    assert outcome.breaker_closed_after_thaw
    await chaos_fleet.check_ready()


async def test_slow_consumers_keep_memory_bounded(chaos_fleet: Fleet) -> None:
    """Readers 5-10x slower than generation: the router holds one fixed HTTP/2 window per stream
    and the backlog stays on the worker, which merges the deltas not taken yet (with the window
    growing on a fast link, as gRPC does by default, the router buffered everything: 3832 chunks
    for 3840 tokens, one per token)."""
    await chaos_fleet.check_ready()
    outcome = await scenarios.slow_consumer(chaos_fleet, streams=6, max_tokens=400, read_delay_s=0.1)
    _no_loss(outcome.figures)
    assert outcome.chunks < 0.75 * outcome.tokens, "the worker did not merge the deltas a slow reader left"
    assert outcome.worker_rss_growth_mb < 64 and outcome.router_rss_growth_mb < 32, outcome
    await chaos_fleet.check_ready()


async def test_worker_sigkill_under_load_loses_no_stream(chaos_fleet: Fleet) -> None:
    """Finding 6: streams past their first token on the killed worker resume elsewhere, with the
    tokens (greedy and seeded) and text of an uninterrupted run; those queued there are retried."""
    await chaos_fleet.check_ready()
    figures = await scenarios.worker_sigkill(chaos_fleet, "w0", streams=120, max_tokens=24, seeded_every=4,
                                             distinct=40)
    _no_loss(figures)
    assert figures.migrated > 0, "no stream was running on the killed worker"
    await chaos_fleet.check_ready()  # the two survivors, idle
