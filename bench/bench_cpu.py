"""CPU benchmark: our engine against HF ``generate``, SmolLM2-135M from its GGUF, float32.

Same process, same weights, same prompts:

- HF ``generate`` at batch 1 (greedy, ``min_new_tokens == max_new_tokens`` so it never stops early);
- our ``LLM.generate`` at batch 1 (greedy, ``ignore_eos``);
- our ``LLM.generate`` with ``--concurrency`` prompts submitted together (aggregate output tok/s);
- the same through ``AsyncLLM`` (the serving path: core thread + asyncio front), same engine core.

Each number is the best of ``--repeats`` timed runs after one warm-up run, the workloads taken in
turn in each round: the machine is shared, and the best run is the one least disturbed. Load
averages before and after are recorded.
``python bench/bench_cpu.py [--write docs/benchmarks/cpu.md]``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gpu_worker import LLM, SamplingParams
from gpu_worker.engine.async_llm import AsyncLLM
from gpu_worker.engine.core_client import ThreadCoreClient
from gpu_worker.model_executor.loader import resolve_alias

HF_BATCH1_TARGET_NOTE = "Targets: batch 1 >= HF batch 1; concurrent >= 3x HF batch 1."
TITLE = "# CPU benchmark: SmolLM2-135M-Instruct (GGUF Q4_1 dequantized), float32"
RESULTS_BEGIN = "<!-- bench_cpu.py results: begin -->\n"
RESULTS_END = "\n<!-- bench_cpu.py results: end -->"
PROMPTS = [
    "The history of the Roman Empire",
    "Write a short poem about the sea.",
    "def quicksort(arr):",
    "In a shocking finding, scientists discovered",
    "The best way to learn a new language is",
    "Once upon a time",
    "List three benefits of regular exercise:",
    "The capital of Japan is",
]


def interleaved_times(fns: list[Callable[[], object]], repeats: int) -> list[list[float]]:
    """Seconds of each run of each function: one warm-up each, then ``repeats`` rounds in turn.

    Taking the workloads in turn, rather than one after the other, exposes them to the same
    background load on a shared machine.
    """
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return times


def load_hf(gguf: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return tok, model.eval()


def hf_batch1(model: Any, prompt_ids: list[int], new_tokens: int) -> None:
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
    assert out.shape[1] == len(prompt_ids) + new_tokens


def ours(llm: LLM, prompts: list[str], new_tokens: int) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outputs)


def ours_async(engine: AsyncLLM, prompts: list[str], new_tokens: int) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)

    async def one(i: int, prompt: str) -> int:
        count = 0
        async for out in engine.generate(prompt, params, f"bench-{time.monotonic_ns()}-{i}"):
            count += len(out.outputs[0].token_ids)
        return count

    async def run() -> list[int]:
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    assert asyncio.run(run()) == [new_tokens] * len(prompts)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                             check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--write", type=Path, default=None, help="write the markdown report here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n, c = args.new_tokens, args.concurrency
    load_before = os.getloadavg()

    gguf = resolve_alias("smollm2-135m")
    hf_tok, hf_model = load_hf(gguf)
    llm = LLM(model="smollm2-135m", dtype="float32")
    prompts = [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" ({i})") for i in range(c)]

    engine = AsyncLLM(ThreadCoreClient(llm.engine.core))  # the same core; idle while LLM.generate runs
    async_wall = [0.0]

    def timed_async() -> None:
        start = time.perf_counter()
        ours_async(engine, prompts, n)
        async_wall[0] += time.perf_counter() - start

    workloads: list[tuple[str, int, Callable[[], object]]] = [
        ("HF generate, batch 1", n, lambda: hf_batch1(hf_model, hf_tok.encode(prompts[0]), n)),
        ("llmserve LLM.generate, batch 1", n, lambda: ours(llm, prompts[:1], n)),
        (f"llmserve LLM.generate, {c} concurrent (aggregate)", c * n, lambda: ours(llm, prompts, n)),
        (f"llmserve AsyncLLM, {c} concurrent (aggregate)", c * n, timed_async),
    ]
    times = interleaved_times([fn for _, _, fn in workloads], args.repeats)
    results = {name: tokens / min(t) for (name, tokens, _), t in zip(workloads, times, strict=True)}
    # The counter covers AsyncLLM's steps only (LLM.generate steps the core on this thread).
    busy = engine.stats().extra["engine_step_time_s"] / async_wall[0]
    asyncio.run(engine.shutdown())
    load_after = os.getloadavg()

    hf = results["HF generate, batch 1"]
    rows = [f"| {name} | {tps:.1f} | {tps / hf:.2f}x |" for name, tps in results.items()]
    report = "\n".join(
        [
            RESULTS_BEGIN,
            "`python bench/bench_cpu.py --write docs/benchmarks/cpu.md`: HF `generate` vs our engine,",
            f"same process and weights; {n} new tokens per request, greedy, EOS ignored; best of",
            f"{args.repeats} runs after a warm-up, the workloads taken in turn in each round.",
            "",
            f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
            f"- machine: {machine()}",
            f"- commit: {commit()}",
            f"- load average (1, 5, 15 min) before: {load_before[0]:.2f}, {load_before[1]:.2f}, "
            f"{load_before[2]:.2f}; after: {load_after[0]:.2f}, {load_after[1]:.2f}, {load_after[2]:.2f}",
            "",
            "| workload | output tok/s | vs HF batch 1 |",
            "| --- | ---: | ---: |",
            *rows,
            "",
            f"AsyncLLM core thread busy (inside EngineCore.step) {busy:.1%} of the wall time of its runs.",
            HF_BATCH1_TARGET_NOTE,
            RESULTS_END,
        ]
    )
    print(report)
    if args.write is not None:
        write_report(args.write, report)


def write_report(path: Path, results: str) -> None:
    """Replace the results section of ``path`` (or create the file), keeping any notes around it."""
    begin, end = RESULTS_BEGIN.strip(), RESULTS_END.strip()
    text = path.read_text() if path.is_file() else f"{TITLE}\n\n{begin}\n{end}\n"
    if begin in text and end in text.split(begin, 1)[1]:
        head, rest = text.split(begin, 1)
        text = head + results.strip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + results + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    main()
