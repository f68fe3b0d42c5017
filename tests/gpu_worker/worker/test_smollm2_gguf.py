"""SmolLM2-135M from its GGUF through our loader and runner vs HF loaded from the same GGUF."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gpu_worker.model_executor import loader

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away, there",
]
NEW_TOKENS = 8


def test_smollm2_gguf_matches_hf(
    smollm2_source: loader.ModelSource,
    smollm2_gguf: Path,
    runner_factory: Any,
    driver_cls: Any,
    logits_spy: Any,
) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    tokenizer = loader.load_tokenizer(smollm2_source)
    runner = runner_factory(smollm2_source.model_dir, num_kv_blocks=64, block_size=16)
    logits = logits_spy(runner)
    driver = driver_cls(runner)
    prompts = {f"p{i}": tokenizer(text)["input_ids"] for i, text in enumerate(PROMPTS)}
    for req_id, ids in prompts.items():
        driver.add(req_id, ids)
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in prompts}
    for _ in range(NEW_TOKENS):
        out = driver.step()
        for i, req_id in enumerate(out.req_ids):
            rows[req_id].append(logits[-1][i])

    for req_id, ids in prompts.items():
        output = driver.seqs[req_id].output
        with torch.no_grad():
            ref = hf(torch.tensor([ids + output[:-1]])).logits[0, len(ids) - 1 :]
            gen = hf.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                pad_token_id=2,
            )[0, len(ids) :]
        torch.testing.assert_close(torch.stack(rows[req_id]), ref, atol=2e-4, rtol=1e-4)
        assert output[: len(gen)] == gen.tolist()
    assert "Paris" in tokenizer.decode(driver.seqs["p0"].output)
