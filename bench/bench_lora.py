"""What multi-LoRA serving costs on a GPU, three arms in one run on one card (docs/LORA.md).

``llama3-8b`` with random bf16 weights (bench_gpu's engine core, CUDA graphs, async scheduling):

- ``base``: no adapters configured (the engine as before);
- ``lora-idle``: two rank-16 adapters on every projection configured, every request on the base
  model (what configuring adapters costs requests that use none: the fused one-token paths step
  aside, the LoRA kernels run and return at once);
- ``lora``: the same engine, requests alternating between the two adapters.

W2 (1 request, 32-token prompt, 128 outputs) and W1 (256 x 512 prompt tokens, 256 outputs each),
each after its warm-up. Prints each arm's tokens/s and its ratio to ``base``; ``--results``
appends the rows (``lora_arm``, ``ratio_to_base``) to a results file.

    python bench/bench_lora.py --commit <sha> --results docs/benchmarks/results.jsonl
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_gpu import WORKLOADS, OurEngine, prompts_for, warm_up, write_config  # noqa: E402
from bench.results import ResultRow, append_results, new_run_id, today  # noqa: E402
from tests.helpers.lora_adapters import write_random_adapter  # noqa: E402

ADAPTERS = ("sql", "chat")


class _LoraEngine(OurEngine):
    """bench_gpu's engine core with the requests of a run spread over ``adapters`` in turn."""

    adapters: tuple[str, ...] = ()

    def run(self, prompts: list[list[int]], max_tokens: int, on_step: Any = None) -> dict[str, Any]:
        if not self.adapters:
            return super().run(prompts, max_tokens, on_step)
        from gpu_worker.core.types import EngineCoreRequest
        from gpu_worker.sampling_params import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        t_start = time.perf_counter()
        for i, p in enumerate(prompts):
            self._ids += 1
            self.core.add_requests([EngineCoreRequest(f"b{self._ids}", tuple(p), params,
                                                      lora_name=self.adapters[i % len(self.adapters)])])
        n_out = 0
        while self.core.has_unfinished():
            n_out += sum(len(o.new_token_ids) for o in self.core.step())
        return dict(elapsed_s=time.perf_counter() - t_start, output_tokens=n_out)


def measure(engine: _LoraEngine, workload: str) -> float:
    _, n, p_len, o_len = WORKLOADS[workload]
    warm_up(engine, workload)
    result = engine.run(prompts_for(n, p_len, 7), o_len)
    return float(result["output_tokens"] / result["elapsed_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--workloads", default="W2,W1")
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    card = torch.cuda.get_device_name()
    workloads = args.workloads.split(",")
    root = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    model = write_config("llama3-8b", root)
    paths = {name: write_random_adapter(model, root / name, rank=args.rank, seed=i, std=0.01)
             for i, name in enumerate(ADAPTERS)}
    modules = ",".join(f"{name}={path}" for name, path in paths.items())
    rates: dict[tuple[str, str], float] = {}
    for arm, engine_args, used in (("base", {}, ()),
                                   ("lora-idle", {"lora_modules": modules, "max_lora_rank": args.rank}, ()),
                                   ("lora", {"lora_modules": modules, "max_lora_rank": args.rank}, ADAPTERS)):
        engine = _LoraEngine(model, **engine_args)
        engine.adapters = used
        for workload in workloads:
            rates[(arm, workload)] = measure(engine, workload)
            print(f"{card} {workload} {arm:9s} {rates[(arm, workload)]:10.1f} tok/s  "
                  f"x{rates[(arm, workload)] / rates[('base', workload)]:.3f} of base", flush=True)
        engine.close()
    if args.results is not None:
        run_id = new_run_id()
        rows = [ResultRow(run_id, today(), args.commit, card, workload, "llama3-8b", "llmserve", rate,
                          extra={"lora_arm": arm, "lora_rank": args.rank, "lora_adapters": len(ADAPTERS),
                                 "ratio_to_base": round(rate / rates[("base", workload)], 4)})
                for (arm, workload), rate in rates.items()]
        append_results(args.results, rows)


if __name__ == "__main__":
    main()
