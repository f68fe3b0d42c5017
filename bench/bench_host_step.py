"""Host work per decode step at 256 running requests: ``Scheduler.schedule`` + ``update``.

Issue 16, item 2: the engine core's own share of a W1-shaped step (256 requests, 512-token
prompts, greedy), with no runner: every request is prefilled first, then ``--steps`` decode steps
are timed and the medians printed. ``--profile`` adds a cProfile of the timed steps. Runs on any
CPU; the numbers are what a step's scheduling costs the host before the runner's input
preparation. ``python bench/bench_host_step.py [--requests 256] [--steps 100] [--profile]``
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import statistics
import time

from gpu_worker.core.kv_cache_manager import KVCacheManager
from gpu_worker.core.scheduler import Scheduler
from gpu_worker.core.types import EngineCoreRequest, RunnerOutput, SchedulerOutput
from gpu_worker.sampling_params import SamplingParams

BLOCK_SIZE = 16


def _sampled(out: SchedulerOutput) -> RunnerOutput:
    ids = tuple(e.req_id for e in out.requests if e.sample)
    return RunnerOutput(req_ids=ids, sampled_token_ids=(7,) * len(ids))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    n, p = args.requests, args.prompt_tokens
    max_tokens = args.steps + 8
    kv = KVCacheManager(n * -(-(p + max_tokens) // BLOCK_SIZE) + 64, BLOCK_SIZE, True)
    sched = Scheduler(kv, n, 8192, p + max_tokens, BLOCK_SIZE, "bench")
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i in range(n):
        sched.add_request(EngineCoreRequest(f"r{i}", tuple(rng.randrange(32000) for _ in range(p)), params))
    while True:  # prefill every request
        out = sched.schedule()
        sched.update(out, _sampled(out), 0.0)
        if len(out.requests) == n and out.num_scheduled_tokens == n:
            break
    prof = cProfile.Profile() if args.profile else None
    t_sched, t_update = [], []
    for _ in range(args.steps):
        if prof is not None:
            prof.enable()
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        runner_out = _sampled(out)
        t2 = time.perf_counter()
        sched.update(out, runner_out, 0.0)
        t3 = time.perf_counter()
        if prof is not None:
            prof.disable()
        t_sched.append(t1 - t0)
        t_update.append(t3 - t2)
    ms_sched, ms_update = statistics.median(t_sched) * 1e3, statistics.median(t_update) * 1e3
    print(f"{n} running requests, {args.steps} decode steps: schedule median {ms_sched:.2f} ms, "
          f"update median {ms_update:.2f} ms")
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
