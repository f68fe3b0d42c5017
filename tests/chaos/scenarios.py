"""The chaos scenarios, each on a fleet from :func:`~tests.chaos.harness.start_fleet`: run by the
tests of this folder at CI sizes and by ``bench/chaos.py`` at full size. Each returns its
:class:`~tests.chaos.harness.Figures` (and records them); the callers assert on them."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass

import psutil

from llmserve.fleet.redis_store import RedisStateStore
from tests.chaos.harness import (
    Figures,
    Fleet,
    Result,
    check,
    make_specs,
    record,
    references,
    run_streams,
    wait_for,
    worker_load,
)

MIGRATIONS = "llmserve:router_migrations_total"
RETRIES = "llmserve:router_retries_total"
BREAKER = "llmserve:router_circuit_breaker_state"
STORE_RESETS = "llmserve:router_fleet_store_resets_total"


def _counters(fleet: Fleet) -> tuple[float, float]:
    return fleet.router_metric(MIGRATIONS), fleet.router_metric(RETRIES)


async def load(fleet: Fleet, *, streams: int, distinct: int, max_tokens: int, timeout_s: float = 600.0
               ) -> Figures:
    """``streams`` concurrent greedy streams through every router; 0 lost, 0 crossed."""
    specs = make_specs(streams, distinct=distinct, max_tokens=max_tokens, tag="load")
    before = _counters(fleet)
    start = time.monotonic()
    results = await run_streams(fleet.targets, specs, timeout_s=timeout_s)
    seconds = time.monotonic() - start
    after = _counters(fleet)
    refs = await references(fleet.targets[0], specs)
    migrated, retried = after[0] - before[0], after[1] - before[1]
    ttft = sorted(r.first_token_s - r.started_s for r in results if r.first_token_s is not None)
    notes = (f"{len(fleet.routers)} routers, {len(fleet.workers)} workers, {distinct} distinct prompts, "
             f"{max_tokens} tokens each; TTFT p50 {ttft[len(ttft) // 2]:.2f} s, max {ttft[-1]:.2f} s"
             if ttft else "")
    figures = check(f"load: {streams} concurrent streams", results, refs, migrated=migrated, retried=retried,
                    seconds=seconds, notes=notes)
    record(figures)
    return figures


async def worker_sigkill(fleet: Fleet, victim: str, *, streams: int, max_tokens: int,
                         seeded_every: int = 4, distinct: int | None = None) -> Figures:
    """SIGKILL ``victim`` once a third of the streams are past their first token: streams that
    were running there resume on another worker, those queued there are retried; each must equal
    its single-request rerun (greedy and seeded)."""
    specs = make_specs(streams, distinct=distinct or streams, max_tokens=max_tokens,
                       seeded_every=seeded_every, tag="kill")
    before = _counters(fleet)
    started = 0
    killed = asyncio.Event()

    def on_chunk(result: Result) -> None:
        nonlocal started
        if result.chunks == 1:
            started += 1
        if started >= streams // 3 and not killed.is_set():
            fleet.workers[victim].kill()
            killed.set()

    t0 = time.monotonic()
    results = await run_streams(fleet.targets, specs, timeout_s=300, on_chunk=on_chunk)
    seconds = time.monotonic() - t0
    assert killed.is_set(), "the victim was never killed"
    after = _counters(fleet)
    fleet.workers.pop(victim).stop()  # the victim leaves the fleet (its log is closed)
    survivors = list(fleet.workers)
    await fleet.wait_registered(survivors)  # its record expired: no router sees it any more
    refs = await references(fleet.targets[0], specs)
    figures = check(f"worker SIGKILL under load ({streams} streams)", results, refs,
                    migrated=after[0] - before[0], retried=after[1] - before[1], seconds=seconds,
                    notes=f"{max_tokens} tokens each, 1 in {seeded_every} seeded; killed {victim} after "
                          f"{streams // 3} streams had started; survivors {survivors}")
    record(figures)
    return figures


async def redis_restart(fleet: Fleet, *, persistence: bool, waves: int, per_wave: int, max_tokens: int,
                        down_s: float = 2.0) -> RedisOutcome:
    """Waves of streams while Redis is SIGKILLed, stays down ``down_s`` and restarts, empty
    (``persistence=False``) or with its data (an append-only file, fsync always): every stream is
    served. Without persistence the store's epoch must change and every router must see it (its
    ``fleet_store_resets`` counter; finding 7); with persistence the epoch must stay."""
    if persistence and not fleet.redis.persistence:
        # What is in Redis when it is killed must already be in its append-only file.
        fleet.redis.stop()
        fleet.redis.persistence = True
        fleet.redis.start()
        await fleet.wait_registered(fleet.workers)
    epoch_before = await _epoch(fleet)
    resets_before = [r.metric(STORE_RESETS) for r in fleet.routers]
    specs = make_specs(waves * per_wave, distinct=per_wave, max_tokens=max_tokens, tag="redis")
    results: list[Result] = []
    t0 = time.monotonic()
    for wave in range(waves):
        batch = specs[wave * per_wave:(wave + 1) * per_wave]
        task = asyncio.create_task(run_streams(fleet.targets, batch, timeout_s=120))
        if wave == 1:
            await asyncio.sleep(0.2)
            fleet.redis.kill()
            fleet.redis.persistence = persistence
            await asyncio.sleep(down_s)
            fleet.redis.start()
        results.extend(await task)
    await fleet.wait_registered(fleet.workers)  # everyone re-registered
    results.extend(await run_streams(fleet.targets, specs[:per_wave], timeout_s=120))  # after
    seconds = time.monotonic() - t0
    epoch_after = await _epoch(fleet)
    resets = [r.metric(STORE_RESETS) - b for r, b in zip(fleet.routers, resets_before, strict=True)]
    # A router reads the store lazily, when a request finds its cached view expired: one that has
    # not read since the restart has not seen it yet. Probe those (one stream each, up to 15 s)
    # so the figure is what each router sees on its next read, not when its last one happened.
    deadline = time.monotonic() + 15
    probes = 0
    while not persistence and min(resets) < 1 and time.monotonic() < deadline:
        lagging = [fleet.routers[i].target for i, n in enumerate(resets) if n < 1]
        await asyncio.sleep(0.5)
        probes += 1  # not figures of the scenario: only a reason for the router to read
        await run_streams(lagging, make_specs(len(lagging), distinct=1, max_tokens=2, tag=f"probe{probes}"),
                          timeout_s=30)
        resets = [r.metric(STORE_RESETS) - b for r, b in zip(fleet.routers, resets_before, strict=True)]
    refs = await references(fleet.targets[0], specs)
    figures = check(f"Redis SIGKILL + restart under load ({'with' if persistence else 'without'} "
                    "persistence)", results, refs, seconds=seconds,
                    notes=f"{waves} waves of {per_wave} streams + 1 after, {max_tokens} tokens each; Redis "
                          f"down {down_s:g} s during wave 2; store epoch "
                          f"{'unchanged' if epoch_after == epoch_before else 'changed'}, store resets seen "
                          f"per router {[int(r) for r in resets]}")
    record(figures)
    return RedisOutcome(figures, epoch_before != epoch_after, [int(r) for r in resets])


@dataclass
class RedisOutcome:
    figures: Figures
    epoch_changed: bool  # the store's epoch token before the kill differs from the one after
    resets_seen: list[int]  # per router: epoch changes it counted (llmserve:router_fleet_store_resets)


async def _epoch(fleet: Fleet) -> str | None:
    store = RedisStateStore(fleet.redis.url)
    try:
        return (await store.read_fleet()).epoch
    finally:
        await store.close()


@dataclass
class FreezeOutcome:
    figures: Figures
    breaker_opened: bool
    overran_deadline: int  # streams that ended later than their deadline + slack
    breaker_closed_after_thaw: bool
    unexpected_failures: int  # failed streams other than DEADLINE_EXCEEDED of the short-deadline cohort


async def worker_sigstop(fleet: Fleet, victim: str, *, streams: int, max_tokens: int, deadline_s: float,
                         short_streams: int = 0, short_deadline_s: float = 1.0, slack_s: float = 3.0
                         ) -> FreezeOutcome:
    """SIGSTOP ``victim`` under load: its streams move (keepalive drops the frozen connections,
    the breaker opens, connection attempts to it time out), none outlives its deadline; after SIGCONT a
    probe closes the breaker again. ``short_streams`` more streams, sent right after the freeze
    with a deadline (``short_deadline_s``) shorter than a failover takes, may expire (certainly
    those sent to the frozen worker; on a loaded CPU fleet, others too): they may end only with
    DEADLINE_EXCEEDED, on time, and leave nothing running behind."""
    specs = make_specs(streams, distinct=streams, max_tokens=max_tokens, seeded_every=5, tag="stop")
    short_specs = make_specs(short_streams, distinct=short_streams, max_tokens=max_tokens, tag="short")
    before = _counters(fleet)
    frozen = asyncio.Event()
    started = 0

    def on_chunk(result: Result) -> None:
        nonlocal started
        if result.chunks == 1:
            started += 1
        if started >= streams // 4 and not frozen.is_set():
            fleet.workers[victim].proc.send_signal(signal.SIGSTOP)
            frozen.set()

    opened = False

    async def watch_breaker() -> None:
        nonlocal opened
        while not opened:
            await asyncio.sleep(0.2)
            states = [await asyncio.to_thread(r.metric, BREAKER, worker_id=victim) for r in fleet.routers]
            opened = 2 in states

    watcher = asyncio.create_task(watch_breaker())
    t0 = time.monotonic()
    # A second wave after the freeze: new requests must avoid the frozen worker.
    first = asyncio.create_task(run_streams(fleet.targets, specs[: streams // 2], timeout_s=deadline_s,
                                            on_chunk=on_chunk))
    await wait_for(frozen.is_set, timeout_s=120)
    second, short = await asyncio.gather(
        run_streams(fleet.targets, specs[streams // 2:], timeout_s=deadline_s),
        run_streams(fleet.targets, short_specs, timeout_s=short_deadline_s),
    )
    results = (await first) + second + short
    seconds = time.monotonic() - t0
    await asyncio.wait({watcher}, timeout=10)
    watcher.cancel()
    short_ids = {spec.request_id for spec in short_specs}

    def limit(r: Result) -> float:
        return short_deadline_s if r.spec.request_id in short_ids else deadline_s

    overran = sum(r.ended_s - r.started_s > limit(r) + slack_s for r in results)
    unexpected = sum(not r.ok and not (r.code == "DEADLINE_EXCEEDED" and r.spec.request_id in short_ids)
                     for r in results)
    longest = max(r.ended_s - r.started_s for r in results if r.spec.request_id not in short_ids)
    fleet.workers[victim].proc.send_signal(signal.SIGCONT)
    closed = await _breaker_closes(fleet, victim)
    after = _counters(fleet)
    refs = await references(fleet.targets[0], specs + short_specs)
    figures = check(f"worker SIGSTOP under load ({streams + short_streams} streams)", results, refs,
                    migrated=after[0] - before[0], retried=after[1] - before[1], seconds=seconds,
                    notes=f"deadline {deadline_s:g} s, {max_tokens} tokens each; froze {victim} after "
                          f"{streams // 4} streams had started; a second wave of {streams - streams // 2} "
                          f"followed, with {short_streams} streams of deadline {short_deadline_s:g} s, "
                          f"shorter than a failover takes (meant to expire); longest other stream "
                          f"{longest:.1f} s")
    record(figures)
    return FreezeOutcome(figures, opened, overran, closed, unexpected)


async def _breaker_closes(fleet: Fleet, worker_id: str, timeout_s: float = 60.0) -> bool:
    """After the thaw: send requests until every router's breaker of ``worker_id`` is closed.
    Each round's prompts are new (no worker has their prefix cached), so routers rank workers by
    load alone and the idle thawed worker gets some (its probe) in a round or two."""
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while time.monotonic() < deadline:
        attempt += 1
        probe = make_specs(len(fleet.workers) * 2, distinct=len(fleet.workers) * 2, max_tokens=2,
                           tag=f"probe{attempt}", prefix=f"Probe round {attempt}")
        await run_streams(fleet.targets, probe, timeout_s=30)
        states = [await asyncio.to_thread(r.metric, BREAKER, worker_id=worker_id) for r in fleet.routers]
        if all(s == 0 for s in states):
            return True
        await asyncio.sleep(1.0)
    return False


@dataclass
class SlowConsumerOutcome:
    figures: Figures
    tokens: int
    chunks: int
    worker_rss_growth_mb: float
    router_rss_growth_mb: float


# A reader with a small HTTP/2 window (16 KiB, no BDP growth): its stream's flow control pushes
# back on the router soon, and through the router on the worker.
SLOW_READER_OPTIONS = (("grpc.http2.lookahead_bytes", 16384), ("grpc.http2.bdp_probe", 0))


async def slow_consumer(fleet: Fleet, *, streams: int, max_tokens: int, read_delay_s: float,
                        logprobs: int = 20) -> SlowConsumerOutcome:
    """Clients that read one chunk every ``read_delay_s`` while the worker generates much faster
    (chunks of ~``logprobs`` x 20 bytes per token): gRPC flow control holds the router back, the
    worker merges the deltas waiting for a slow reader into one chunk, and neither process's
    memory grows with the backlog (peak RSS sampled every 0.2 s, after a warm-up that loads the
    router's tokenizer)."""
    warm = make_specs(len(fleet.routers) * 2, distinct=2, max_tokens=2, tag="warm")
    await run_streams(fleet.targets, warm, timeout_s=60)
    specs = make_specs(streams, distinct=streams, max_tokens=max_tokens, tag="slow", logprobs=logprobs)
    workers = [psutil.Process(w.proc.pid) for w in fleet.workers.values()]
    routers = [psutil.Process(r.proc.pid) for r in fleet.routers]
    worker_rss = sum(p.memory_info().rss for p in workers)
    router_rss = sum(p.memory_info().rss for p in routers)
    peak_worker, peak_router = worker_rss, router_rss

    async def sample() -> None:
        nonlocal peak_worker, peak_router
        while True:
            peak_worker = max(peak_worker, sum(p.memory_info().rss for p in workers))
            peak_router = max(peak_router, sum(p.memory_info().rss for p in routers))
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample())
    t0 = time.monotonic()
    try:
        results = await run_streams(fleet.targets, specs, timeout_s=600, read_delay_s=read_delay_s,
                                    channel_options=SLOW_READER_OPTIONS)
    finally:
        sampler.cancel()
    seconds = time.monotonic() - t0
    refs = await references(fleet.targets[0], specs)
    tokens = sum(len(r.tokens) for r in results)
    chunks = sum(r.chunks for r in results)
    mb = 1 << 20
    outcome = SlowConsumerOutcome(
        check(f"slow consumers ({streams} streams)", results, refs, seconds=seconds,
              notes=f"{max_tokens} tokens each with top-{logprobs} logprobs, read one chunk per "
                    f"{read_delay_s:g} s through a 16 KiB window: {tokens} tokens in {chunks} chunks; "
                    f"peak RSS growth worker(s) {(peak_worker - worker_rss) / mb:.1f} MB, router(s) "
                    f"{(peak_router - router_rss) / mb:.1f} MB"),
        tokens, chunks, (peak_worker - worker_rss) / mb, (peak_router - router_rss) / mb)
    record(outcome.figures)
    return outcome


async def idle(fleet: Fleet, worker_ids: list[str]) -> bool:
    """True when every listed worker holds no request and no KV block."""
    for worker_id in worker_ids:
        load = await worker_load(fleet.workers[worker_id].address)
        if load.num_running or load.num_waiting or load.num_free_kv_blocks != load.num_kv_blocks:
            return False
    return True
