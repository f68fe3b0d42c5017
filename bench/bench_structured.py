"""Structured-output overhead on the CPU: 16 concurrent JSON-schema requests vs 16 unconstrained.

SmolLM2-135M-Instruct (the ``smollm2-135m`` alias), float32, offline ``LLM``. Both workloads run
the same 16 chat prompts for exactly ``--max-tokens`` tokens each (unconstrained with
``ignore_eos``; constrained by a schema whose output is longer than that, so no sequence ends
early), at temperature 0.8 with per-request seeds: same batch shape and step count, so the
difference is the structured-output work (compiling is excluded by a warm-up run, as a warm server
has its grammar cached; matchers, bitmask filling on the CPU and the one masking kernel per step
are included). Each number is the best of ``--repeats`` rounds, the workloads taken in turn
(the machine is shared). Besides wall-clock tokens/s, the process's CPU time per 1000 tokens (all
threads), and the time spent in structured-output code per constrained step (the core's matcher
and bitmask work, ``StructuredOutputManager.prepare_step``, plus the runner's mask,
``GrammarMask``), against the step time: on a shared machine other jobs move wall-clock rates by
more than the effect measured. Target: constrained tokens/s within 10% of unconstrained.

Threads: the bench runs torch on ``--threads`` intra-op threads (default 1). On the shared 2-core
machine, two OpenMP threads wait for each other at every barrier of every op while the other is
descheduled by other jobs: a step's time then depends on the machine's load, not on the workload
(decode steps of the same shape took 0.12 to 2 s, with 3 to 10 times the CPU time, spinning), and
which round it hits is chance. On one thread the model's forward costs the same CPU time for the
JSON tokens and the free text (docs/BENCHMARKS.md). Denormals are flushed to zero
(``torch.set_flush_denormal``) unless ``--keep-denormals``; it made no measured difference.

``python bench/bench_structured.py [--repeats 3] [--max-tokens 64] [--threads 1]``
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch

from gpu_worker import LLM, SamplingParams
from gpu_worker.structured.bitmask import GrammarMask
from gpu_worker.structured.manager import StructuredOutputManager

CONCURRENCY = 16
# An array of 60 objects: far longer than --max-tokens, so every constrained sequence runs to length.
SCHEMA = {
    "type": "array", "minItems": 60, "maxItems": 60,
    "items": {"type": "object", "required": ["id", "name", "ok"], "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 9999},
        "name": {"type": "string", "maxLength": 12},
        "ok": {"type": "boolean"},
    }},
}


def run(llm: LLM, prompts: list[str], constrained: bool, max_tokens: int) -> tuple[float, float, int]:
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=max_tokens, ignore_eos=not constrained,
                             structured_output={"json": SCHEMA} if constrained else None)  # type: ignore[arg-type]
              for i in range(len(prompts))]
    start, cpu_start = time.perf_counter(), time.process_time()
    outputs = llm.generate(prompts, params)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)
    return elapsed, cpu, tokens


class StructuredTimer:
    """Seconds spent in the structured-output hooks (wrapped for the bench only)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.steps = 0
        prepare = StructuredOutputManager.prepare_step
        build, mask = GrammarMask.__init__, GrammarMask.__call__

        def timed_prepare(manager: Any, sched: Any, lookup: Any) -> Any:
            start = time.perf_counter()
            out = prepare(manager, sched, lookup)
            self.seconds += time.perf_counter() - start
            self.steps += out.grammar is not None
            return out

        def timed_build(stage: Any, *args: Any) -> None:
            start = time.perf_counter()
            build(stage, *args)
            self.seconds += time.perf_counter() - start

        def timed_mask(stage: Any, logits: Any) -> Any:
            start = time.perf_counter()
            out = mask(stage, logits)
            self.seconds += time.perf_counter() - start
            return out

        StructuredOutputManager.prepare_step = timed_prepare  # type: ignore[method-assign,assignment]
        GrammarMask.__init__ = timed_build  # type: ignore[method-assign,assignment]
        GrammarMask.__call__ = timed_mask  # type: ignore[method-assign,assignment]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--keep-denormals", action="store_true", help="do not flush denormals to zero")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both workloads)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flushed = not args.keep_denormals and torch.set_flush_denormal(True)
    llm = LLM(model="smollm2-135m", max_num_seqs=CONCURRENCY)
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": f"List 60 inventory records as JSON, batch {i}."}],
        add_generation_prompt=True, tokenize=False) for i in range(CONCURRENCY)]
    best: dict[str, float] = {}
    cpu_ms: dict[str, float] = {}
    run(llm, prompts, True, 4)  # warm-up: compiles the grammar, like a server that has seen the schema
    timer = StructuredTimer()
    step_s: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, constrained in (("unconstrained", False), ("json_schema", True)):
            llm.reset_prefix_cache()
            elapsed, cpu, tokens = run(llm, prompts, constrained, args.max_tokens)
            step_s[name] = min(step_s.get(name, float("inf")), elapsed / args.max_tokens)
            best[name] = max(best.get(name, 0.0), tokens / elapsed)
            cpu_ms[name] = min(cpu_ms.get(name, float("inf")), 1000 * cpu / tokens * 1000)
    ratio = best["json_schema"] / best["unconstrained"]
    print(json.dumps({
        "bench": "structured_output", "model": "smollm2-135m", "device": "cpu", "concurrency": CONCURRENCY,
        "max_tokens": args.max_tokens, "repeats": args.repeats,
        "flush_denormal": flushed, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_avg": os.getloadavg(), "unconstrained_tok_s": round(best["unconstrained"], 1),
        "json_schema_tok_s": round(best["json_schema"], 1), "ratio": round(ratio, 3),
        "unconstrained_cpu_ms_per_1k_tok": round(cpu_ms["unconstrained"]),
        "json_schema_cpu_ms_per_1k_tok": round(cpu_ms["json_schema"]),
        "structured_ms_per_step": round(1000 * timer.seconds / max(timer.steps, 1), 2),
        "best_step_ms": {k: round(1000 * v) for k, v in step_s.items()},
        "within_10_percent": ratio >= 0.9,
    }))


if __name__ == "__main__":
    main()
