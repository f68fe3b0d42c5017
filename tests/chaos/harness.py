"""The chaos and load harness: a real fleet on loopback (redis-server, ``python -m gpu_worker``
workers and ``python -m router`` routers, each its own process, so SIGKILL and SIGSTOP are real),
a load of concurrent streams, and the check of every stream against a single-request rerun.

Used by ``tests/chaos/`` (sizes bounded for CI) and ``bench/chaos.py`` (full size). Figures per
scenario (streams sent, completed, migrated, retried, failed) are printed and, when the
environment variable ``LLMSERVE_CHAOS_REPORT`` names a file, appended to it as JSON lines
(docs/RELIABILITY.md is written from them).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from llmserve.fleet.redis_store import RedisStateStore
from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc
from llmserve.v1 import internal_pb2 as ipb
from llmserve.v1 import internal_pb2_grpc as ipb_grpc
from tests.helpers.redis_server import RedisServer
from tests.helpers.service_procs import RouterProc, WorkerProc, stop_all

MODEL = "chaos"
# Fast failure detection on loopback (production defaults are 5 s): a frozen worker's connection
# is dropped after 1 s + 1 s without a ping answer, a new connection attempt to it after 2 s.
ROUTER_FAILOVER_ARGS = ("--worker-connect-timeout-s", "2", "--worker-keepalive-s", "1",
                        "--breaker-cooldown-s", "3", "--registry-cache-s", "0.5")
WORDS = ("the", "cache", "router", "worker", "stream", "token", "block", "queue", "model", "fleet",
         "prefix", "kernel", "batch", "paged", "redis", "chaos")


@dataclass
class Fleet:
    """Processes of one chaos fleet; ``stop()`` ends them all."""

    redis: RedisServer
    workers: dict[str, WorkerProc]
    routers: list[RouterProc]

    @property
    def targets(self) -> list[str]:
        return [r.target for r in self.routers]

    def router_metric(self, name: str, **labels: str) -> float:
        return sum(r.metric(name, **labels) for r in self.routers)

    async def wait_registered(self, worker_ids: Iterable[str], timeout_s: float = 30.0) -> None:
        """Until the store lists exactly ``worker_ids`` (bounded)."""
        want = set(worker_ids)
        store = RedisStateStore(self.redis.url)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    if {w.worker_id for w in (await store.read_fleet()).workers} == want:
                        return
                except Exception:  # noqa: BLE001 - Redis restarting
                    pass
                assert time.monotonic() < deadline, f"workers {sorted(want)} not registered in time"
                await asyncio.sleep(0.1)
        finally:
            await store.close()

    async def check_ready(self, timeout_s: float = 60.0) -> None:
        """Every worker alive, registered and idle (every KV block free): the state each scenario
        starts from and must leave behind (bounded)."""
        for worker in self.workers.values():
            assert worker.proc.poll() is None, f"worker {worker.worker_id} died: {worker.log_path}"
        await self.wait_registered(self.workers, timeout_s)
        deadline = time.monotonic() + timeout_s
        for worker_id, worker in self.workers.items():
            while True:
                load = await worker_load(worker.address)
                busy = load.num_running or load.num_waiting
                if not busy and load.num_free_kv_blocks == load.num_kv_blocks:
                    break
                assert time.monotonic() < deadline, f"worker {worker_id} not idle: {load}"
                await asyncio.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM to every router and worker at once (a frozen worker gets SIGCONT first), then
        wait for them (SIGKILL after 20 s), then Redis."""
        for worker in self.workers.values():
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGCONT)  # a frozen worker must be able to exit
        stop_all([*self.routers, *self.workers.values()], timeout_s=20)
        self.redis.stop()


async def start_fleet(model_dir: Path, workdir: Path, *, workers: int = 2, routers: int = 2,
                      worker_args: Sequence[str] = (), router_args: Sequence[str] = (),
                      persistence: bool = False) -> Fleet:
    """Redis, ``workers`` workers serving :data:`MODEL` and ``routers`` routers, all serving."""
    (workdir / "redis").mkdir(parents=True, exist_ok=True)
    redis = RedisServer(workdir / "redis", persistence=persistence)
    redis.start()
    procs: dict[str, WorkerProc] = {}
    fleet = Fleet(redis, procs, [])
    try:
        for i in range(workers):
            w = WorkerProc(model_dir, MODEL, redis.url, workdir, worker_args, f"w{i}")
            procs[w.worker_id] = w
        fleet.routers.extend(RouterProc(redis.url, workdir, f"r{i}", (*ROUTER_FAILOVER_ARGS, *router_args))
                             for i in range(routers))
        for w in procs.values():
            await asyncio.to_thread(w.wait_serving)
        for r in fleet.routers:
            await asyncio.to_thread(r.wait_serving)
        await fleet.wait_registered(procs)
    except BaseException:
        fleet.stop()
        raise
    return fleet


# ---------------------------------------------------------------------- load and checks


@dataclass(frozen=True)
class Spec:
    """One stream to run: the request (model set by the harness) and its reference key."""

    request_id: str
    prompt: str
    sampling: pb.SamplingParams

    @property
    def key(self) -> tuple[str, bytes]:
        return self.prompt, self.sampling.SerializeToString(deterministic=True)

    def request(self) -> pb.GenerateRequest:
        return pb.GenerateRequest(model=MODEL, prompt=self.prompt, sampling=self.sampling,
                                  request_id=self.request_id)


def make_specs(count: int, *, distinct: int, max_tokens: int, seeded_every: int = 0,
               tag: str = "s", logprobs: int | None = None, prefix: str = "Prompt") -> list[Spec]:
    """``count`` streams over ``distinct`` prompts (each ~12-20 tokens, starting with ``prefix``),
    greedy, ``ignore_eos`` so every stream has exactly ``max_tokens`` tokens; every
    ``seeded_every``-th stream samples with temperature 0.9 and its own seed instead (0: none).
    ``logprobs``: top-N logprobs per token (larger chunks)."""
    specs = []
    for i in range(count):
        p = i % distinct
        words = " ".join(WORDS[(p * 7 + k * 3) % len(WORDS)] for k in range(8 + p % 9))
        prompt = f"{prefix} {p}: {words}"
        if seeded_every and i % seeded_every == 0:
            sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=0.9, top_k=100, seed=1000 + p,
                                         ignore_eos=True)
        else:
            sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        if logprobs is not None:
            sampling.logprobs = logprobs
        specs.append(Spec(f"{tag}-{i}", prompt, sampling))
    return specs


@dataclass
class Result:
    """What a client saw of one stream."""

    spec: Spec
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    code: str = "OK"
    details: str = ""
    finish: str = ""
    worker_id: str = ""
    chunks: int = 0
    foreign_ids: int = 0  # chunks carrying another request's id
    started_s: float = 0.0
    first_token_s: float | None = None
    ended_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.code == "OK"


async def run_streams(
    targets: Sequence[str], specs: Sequence[Spec], *, timeout_s: float, read_delay_s: float = 0.0,
    on_chunk: Callable[[Result], None] | None = None, channel_options: Sequence[tuple[str, int]] = (),
) -> list[Result]:
    """All ``specs`` at once, stream ``i`` through ``targets[i % len(targets)]`` (one channel per
    target); each with a deadline of ``timeout_s``. ``read_delay_s``: a slow consumer sleeping
    between reads. ``on_chunk(result)`` after each chunk (chaos injection points)."""
    options = [("grpc.max_receive_message_length", -1), *channel_options]
    channels = [grpc.aio.insecure_channel(t, options=options) for t in targets]
    try:
        stubs = [pb_grpc.GenerationStub(c) for c in channels]
        streams = [_one(stubs[i % len(stubs)], spec, timeout_s, read_delay_s, on_chunk)
                   for i, spec in enumerate(specs)]
        return await asyncio.gather(*streams)
    finally:
        for channel in channels:
            await channel.close()


async def _one(stub: pb_grpc.GenerationStub, spec: Spec, timeout_s: float, read_delay_s: float,
               on_chunk: Callable[[Result], None] | None) -> Result:
    result = Result(spec, started_s=time.monotonic())
    try:
        call = stub.Generate(spec.request(), timeout=timeout_s)
        async for chunk in call:
            result.chunks += 1
            result.foreign_ids += chunk.request_id != spec.request_id
            result.tokens.extend(chunk.token_ids)
            result.text += chunk.text
            if chunk.token_ids and result.first_token_s is None:
                result.first_token_s = time.monotonic()
            if chunk.finish_reason:
                result.finish = chunk.finish_reason
            if chunk.worker_id:
                result.worker_id = chunk.worker_id
            if on_chunk is not None:
                on_chunk(result)
            if read_delay_s:
                await asyncio.sleep(read_delay_s)
    except grpc.aio.AioRpcError as exc:
        result.code, result.details = exc.code().name, exc.details() or ""
    result.ended_s = time.monotonic()
    return result


async def references(target: str, specs: Iterable[Spec], timeout_s: float = 120.0
                     ) -> dict[tuple[str, bytes], Result]:
    """Each distinct (prompt, sampling) run alone, one after the other: the uninterrupted,
    unbatched answer every stream of the load must equal."""
    unique = {spec.key: spec for spec in specs}
    out: dict[tuple[str, bytes], Result] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        for key, spec in unique.items():
            ref = await _one(stub, Spec(f"ref-{len(out)}", spec.prompt, spec.sampling), timeout_s, 0.0, None)
            assert ref.ok, f"reference run failed: {ref.code} {ref.details}"
            out[key] = ref
    return out


@dataclass
class Figures:
    """One scenario's outcome, as docs/RELIABILITY.md reports it."""

    scenario: str
    sent: int
    completed: int  # OK, and token for token (and text) equal to the single-request rerun
    migrated: int  # resumptions on another worker after a first token (router_migrations_total)
    retried: int  # attempts after a request's first, resumptions included (router_retries_total)
    failed: int  # ended with an error status
    crossed: int  # OK but different from the rerun, or carrying another request's id
    deadline_expired: int = 0  # of the failed: DEADLINE_EXCEEDED
    seconds: float = 0.0
    notes: str = ""
    examples: list[str] = field(default_factory=list)  # a few failed or crossed streams

    def as_json(self) -> str:
        return json.dumps(asdict(self))


def check(scenario: str, results: Sequence[Result], refs: dict[tuple[str, bytes], Result], *,
          migrated: float = 0, retried: float = 0, seconds: float = 0.0, notes: str = "") -> Figures:
    """Compare every stream with its reference; the figures of the scenario."""
    completed = crossed = failed = expired = 0
    examples = []
    for r in results:
        if not r.ok:
            failed += 1
            expired += r.code == "DEADLINE_EXCEEDED"
            examples.append(f"{r.spec.request_id}: {r.code} {r.details[:300]}")
            continue
        ref = refs[r.spec.key]
        if r.tokens == ref.tokens and r.text == ref.text and r.foreign_ids == 0 and r.finish == ref.finish:
            completed += 1
        else:
            crossed += 1
            examples.append(f"{r.spec.request_id}: {len(r.tokens)} tokens, {r.foreign_ids} foreign chunks, "
                            f"first difference at {_first_difference(r.tokens, ref.tokens)}; text equal: "
                            f"{r.text == ref.text}")
    return Figures(scenario, len(results), completed, int(migrated), int(retried), failed, crossed, expired,
                   round(seconds, 1), notes, examples[:5])


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def record(figures: Figures) -> None:
    """Print the figures; append them to ``$LLMSERVE_CHAOS_REPORT`` when set."""
    print(f"chaos figures: {figures.as_json()}", flush=True)
    path = os.environ.get("LLMSERVE_CHAOS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(figures.as_json() + "\n")


def describe_failures(results: Sequence[Result], limit: int = 5) -> str:
    """A few failed or mismatched streams, for assertion messages."""
    bad = [r for r in results if not r.ok][:limit]
    return "; ".join(f"{r.spec.request_id}: {r.code} {r.details[:200]}" for r in bad)


async def worker_load(address: str) -> ipb.LoadReport:
    """A worker's load through WorkerControl.GetWorkerInfo (loopback: allowed without mTLS)."""
    async with grpc.aio.insecure_channel(address) as channel:
        info = await ipb_grpc.WorkerControlStub(channel).GetWorkerInfo(ipb.GetWorkerInfoRequest(), timeout=10)
    return info.load


async def wait_for(cond: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> None:
    """Poll a condition until true (bounded)."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(interval_s)
