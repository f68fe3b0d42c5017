"""Speculative decoding on the CPU: n-gram (prompt lookup) drafts vs plain decoding, batch 1.

SmolLM2-135M-Instruct (the ``smollm2-135m`` alias), float32, offline ``LLM``, one request at a
time, greedy, on a fixed set of copy-heavy chat prompts (:data:`PROMPTS`: code edits that rewrite
a function, a summary that quotes its source verbatim, an extraction that copies lines): the work
prompt lookup is for. Both engines run in the same process on the same prompts, taken in turn
for ``--repeats`` rounds (the machine is shared; each engine's best round counts); their outputs
must be identical token for token (greedy), which the bench checks. Each prompt is measured twice
per round and engine: *decode* (its prompt already in the prefix cache, so the request's time is
its decoding: output tokens/s, the issue's measure; target 1.5x) and *end to end* (prefix cache
emptied first: the prompt's prefill counted too). Reported: tokens/s of each engine, the speedups,
the drafts' acceptance rate and acceptance per position.

Random weights on a GPU would say nothing here: acceptance depends on the model actually copying
its prompt, so this bench is meaningful only with trained weights (docs/BENCHMARKS.md).

Defaults: ``k = 8``, n-grams of 3 to 5 tokens. On SmolLM2 with one thread a verify step of
``1 + k`` rows costs about ``1 + 0.27 k`` plain steps (the CPU's matrix products are compute-bound
from a few rows), so a draft position pays while it is accepted more than about a quarter of
the time; in a sweep over these prompts (CPU seconds per token, one thread) k = 8 with n-grams
of 3-5 gave 1.95x plain, k = 6 1.75x, k = 10 1.83x, n-grams from 2 (more drafts, fewer
accepted) less.

Threads: ``--threads`` intra-op threads for both arms (default 1). On the shared 2-core VM this
bench was written on, two threads made a decode step 10-15x slower whenever other jobs held a core
(OpenMP's barriers wait for a descheduled thread: 48 tokens took 49 s with 2 threads and 3.8 s
with 1, same load), which buried the effect measured; one thread gives stable numbers.

Denormals are flushed to zero in both arms (``torch.set_flush_denormal``), as in
``bench_structured.py``: SmolLM2's float32 activations hold denormals on some outputs, which
slows the CPU's matmuls several-fold whatever the engine does; ``--keep-denormals`` keeps them.

``python bench/bench_spec_decode.py [--repeats 3] [--max-tokens 128] [--k 8] [--lookup-min 3]
[--lookup-max 5] [--threads 1]``
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from gpu_worker import LLM, SamplingParams

_FUNCTION = '''def summarize_orders(orders, min_total):
    """Group paid orders by customer and keep the customers above a total."""
    totals = {}
    for order in orders:
        if order["status"] != "paid":
            continue
        customer = order["customer_id"]
        totals[customer] = totals.get(customer, 0) + order["amount"]
    result = []
    for customer, total in sorted(totals.items()):
        if total >= min_total:
            result.append({"customer_id": customer, "total": round(total, 2)})
    return result
'''

_ARTICLE = (
    "The city council met on Tuesday to discuss the new bicycle lanes. "
    "\"We expect the lanes on Main Street to be finished by the end of May,\" said the transport "
    "director, Maria Lopez. Several shop owners were worried about parking. \"Half of my customers "
    "come by car, and they need somewhere to stop,\" said Tom Becker, who runs a bakery on Main Street. "
    "The council voted seven to two to continue the project, and promised to add twenty short-stay "
    "parking spaces on Elm Street. \"This is a compromise that works for everyone,\" said Lopez."
)

_CSV = "\n".join([
    "id,name,city,status",
    "1,Alice Martin,Lyon,active",
    "2,Bruno Costa,Porto,inactive",
    "3,Chen Wei,Lyon,active",
    "4,Dara Singh,Leeds,active",
    "5,Eva Novak,Porto,active",
    "6,Femi Ade,Lyon,inactive",
])

PROMPTS: dict[str, str] = {
    "code_rename": "Rewrite this Python function, renaming the variable `totals` to `by_customer`. "
                   "Output only the complete function.\n\n" + _FUNCTION,
    "code_docstring": "Add a line `# TODO: validate input` as the first line of the body of this function. "
                      "Output the whole function unchanged otherwise.\n\n" + _FUNCTION,
    "summary_quotes": "Summarize this article in two sentences, then list every quotation in it "
                      "verbatim, one per line.\n\n" + _ARTICLE,
    "extract_rows": "Copy the rows of this CSV whose city is Lyon or Porto, keeping the header "
                    "line, exactly as they appear.\n\n" + _CSV,
}


def chat_prompts(llm: LLM) -> dict[str, str]:
    tokenizer = llm.get_tokenizer()
    return {
        name: tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=False)
        for name, text in PROMPTS.items()
    }


def run_one(llm: LLM, prompt: str, max_tokens: int) -> tuple[list[int], float, float]:
    """One request alone (batch 1): its tokens, wall seconds and this process's CPU seconds."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    start, cpu_start = time.perf_counter(), time.process_time()
    (output,) = llm.generate([prompt], params)
    return list(output.outputs[0].token_ids), time.perf_counter() - start, time.process_time() - cpu_start


def best_rates(tokens: dict[str, list[int]], seconds: dict[str, float]) -> float:
    return sum(len(t) for t in tokens.values()) / sum(seconds.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=8, help="num_speculative_tokens")
    parser.add_argument("--lookup-min", type=int, default=3, help="prompt_lookup_min")
    parser.add_argument("--lookup-max", type=int, default=5, help="prompt_lookup_max")
    parser.add_argument("--keep-denormals", action="store_true", help="do not flush denormals to zero")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both arms)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flushed = not args.keep_denormals and torch.set_flush_denormal(True)
    spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": args.lookup_min,
            "prompt_lookup_max": args.lookup_max}
    engines = {"plain": LLM(model="smollm2-135m", max_num_seqs=1),
               "ngram": LLM(model="smollm2-135m", max_num_seqs=1, speculative_config=spec)}
    prompts = chat_prompts(engines["plain"])
    for llm in engines.values():  # warm-up: first-call costs out of the measurement
        run_one(llm, prompts["extract_rows"], 8)
    modes = ("decode", "end_to_end")
    seconds = {(e, m): {} for e in engines for m in modes}  # type: dict[tuple[str, str], dict[str, float]]
    cpu_seconds = {(e, m): {} for e in engines for m in modes}  # type: dict[tuple[str, str], dict[str, float]]
    tokens: dict[str, dict[str, list[int]]] = {name: {} for name in engines}
    before = engines["ngram"].engine.stats().spec_decode
    for _ in range(args.repeats):
        for prompt_name, prompt in prompts.items():
            for name, llm in engines.items():
                for mode in modes:
                    if mode == "end_to_end":
                        llm.reset_prefix_cache()
                    else:
                        run_one(llm, prompt, 1)  # its prompt in the prefix cache
                    out, elapsed, cpu = run_one(llm, prompt, args.max_tokens)
                    key = (name, mode)
                    seconds[key][prompt_name] = min(seconds[key].get(prompt_name, float("inf")), elapsed)
                    cpu_seconds[key][prompt_name] = min(cpu_seconds[key].get(prompt_name, float("inf")), cpu)
                    tokens[name].setdefault(prompt_name, out)
                    assert tokens[name][prompt_name] == out, f"{name} {prompt_name}: output changed"
    after = engines["ngram"].engine.stats().spec_decode
    assert before is not None and after is not None
    rates = {
        f"{e}_{m}_tok_s": round(best_rates(tokens[e], seconds[(e, m)]), 1) for e in engines for m in modes
    }
    speedups = {
        f"{m}_speedup": round(rates[f"ngram_{m}_tok_s"] / rates[f"plain_{m}_tok_s"], 2) for m in modes
    }
    cpu_speedups = {
        f"{m}_cpu_speedup": round(best_rates(tokens["ngram"], cpu_seconds[("ngram", m)])
                                  / best_rates(tokens["plain"], cpu_seconds[("plain", m)]), 2)
        for m in modes
    }
    per_prompt = {
        prompt_name: {"tokens": len(tokens["plain"][prompt_name]), **{
            f"{m}_speedup": round(seconds[("plain", m)][prompt_name] / seconds[("ngram", m)][prompt_name], 2)
            for m in modes}}
        for prompt_name in prompts
    }
    drafts = after.num_draft_tokens - before.num_draft_tokens
    accepted = after.num_accepted_tokens - before.num_accepted_tokens
    steps = after.num_drafts - before.num_drafts
    old = list(before.num_accepted_tokens_per_pos)
    per_pos = [a - (old[i] if i < len(old) else 0) for i, a in enumerate(after.num_accepted_tokens_per_pos)]
    print(json.dumps({
        "bench": "spec_decode_ngram", "model": "smollm2-135m", "device": "cpu", "batch": 1,
        "speculative_config": spec, "max_tokens": args.max_tokens, "repeats": args.repeats,
        "flush_denormal": flushed, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_avg": [round(x, 2) for x in os.getloadavg()], **rates, **speedups, **cpu_speedups,
        "target_met": speedups["decode_speedup"] >= 1.5,
        "greedy_outputs_identical": tokens["plain"] == tokens["ngram"],
        "acceptance_rate": round(accepted / drafts, 3) if drafts else 0.0,
        "acceptance_per_position": [round(a / steps, 3) for a in per_pos] if steps else [],
        "mean_tokens_per_verify_step": round(1 + accepted / steps, 2) if steps else 1.0,
        "per_prompt": per_prompt,
    }, indent=1))


if __name__ == "__main__":
    main()
