"""Shared data of the accuracy tests on SmolLM2-135M (quantized weights, fp8 KV cache): a fixed
held-in text, greedy prompts, and perplexity from one prefill through a model runner (any device)."""

from __future__ import annotations

import math
from typing import Any

import torch

from gpu_worker.model_executor.layers.attention import AttentionMetadata
from gpu_worker.worker.model_runner import ModelRunner

# Held-in text: plain encyclopedic English of the kind the model was trained on (~330 tokens).
TEXT = (
    "The printing press is a mechanical device for applying pressure to an inked surface resting "
    "upon a print medium, such as paper or cloth, thereby transferring the ink. It marked a dramatic "
    "improvement on earlier printing methods in which the cloth, paper or other medium was brushed "
    "or rubbed repeatedly to achieve the transfer of ink, and accelerated the process. Typically "
    "used for texts, the invention and global spread of the printing press was one of the most "
    "influential events in the second millennium. In Germany, around 1440, the goldsmith Johannes "
    "Gutenberg invented the movable-type printing press, which started the Printing Revolution. "
    "Modelled on the design of existing screw presses, a single Renaissance movable-type printing "
    "press could produce up to 3,600 pages per workday, compared to forty by typographic "
    "hand-printing and a few by hand-copying. Gutenberg's newly devised hand mould made possible "
    "the precise and rapid creation of metal movable type in large quantities. His two inventions, "
    "the hand mould and the movable-type printing press, together drastically reduced the cost of "
    "printing books and other documents in Europe, particularly for shorter print runs. From Mainz "
    "the movable-type printing press spread within several decades to over two hundred cities in "
    "a dozen European countries. By 1500, printing presses in operation throughout Western Europe "
    "had already produced more than twenty million volumes. In the 16th century, with presses "
    "spreading further afield, their output rose tenfold to an estimated 150 to 200 million copies. "
    "The operation of a press became synonymous with the enterprise of printing, and lent its name "
    "to a new medium of expression and communication, the press. The spread of mechanical movable "
    "type printing in Europe in the Renaissance introduced the era of mass communication, which "
    "permanently altered the structure of society."
)
GREEDY_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Water boils at a temperature of",
    "The three primary colors are",
    "Once upon a time, there was a little",
    "To make a cup of tea, first",
    "The largest planet in the solar system is",
    "Machine learning is a field of study that",
]


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    """exp(mean negative log-likelihood of each token after the first)."""
    logprobs = torch.log_softmax(logits[:-1].double(), dim=-1)
    target = torch.tensor(ids[1:])
    return math.exp(-float(logprobs[torch.arange(len(target)), target].mean()))


def sequence_logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    """Float32 logits ``[T, V]`` of one prefill of ``ids`` through the runner's model."""
    n, dev = len(ids), runner.device
    blocks = -(-n // runner.block_size)
    md = AttentionMetadata(
        slot_mapping=torch.arange(n, device=dev),
        block_tables=torch.arange(blocks, dtype=torch.int32, device=dev)[None],
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev),
        seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
        max_query_len=n, max_seq_len=n,
    )
    hidden = runner.forward(torch.tensor(ids, device=dev), torch.arange(n, device=dev), md)
    with torch.inference_mode():
        logits: torch.Tensor = runner.model.compute_logits(hidden)  # type: ignore[operator]
    return logits.float()


def text_ids(tokenizer: Any) -> list[int]:
    """:data:`TEXT` tokenized (about 330 tokens)."""
    ids: list[int] = tokenizer(TEXT)["input_ids"]
    assert 250 <= len(ids) <= 400, len(ids)
    return ids


def greedy_continuations(runner: ModelRunner, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (token ids) through the runner's model: one batched
    prefill, then ``max_tokens - 1`` batched decode steps over the paged KV cache (each sequence
    in blocks of its own), argmax of the float32 logits."""
    dev, bs = runner.device, runner.block_size
    per_seq = -(-(max(len(p) for p in prompts) + max_tokens) // bs)
    tables = torch.arange(len(prompts) * per_seq, dtype=torch.int32).reshape(len(prompts), per_seq)
    seqs = [list(p) for p in prompts]
    feeds = [list(p) for p in prompts]  # the tokens each sequence feeds this step
    outs: list[list[int]] = [[] for _ in prompts]
    with torch.inference_mode():
        for _ in range(max_tokens):
            ids: list[int] = []
            positions: list[int] = []
            slots: list[int] = []
            starts = [0]
            for i, (seq, feed) in enumerate(zip(seqs, feeds, strict=True)):
                first = len(seq) - len(feed)
                for j, token in enumerate(feed):
                    p = first + j
                    ids.append(token)
                    positions.append(p)
                    slots.append(int(tables[i, p // bs]) * bs + p % bs)
                starts.append(starts[-1] + len(feed))
            md = AttentionMetadata(
                slot_mapping=torch.tensor(slots, device=dev),
                block_tables=tables.to(dev),
                query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
                seq_lens=torch.tensor([len(s) for s in seqs], dtype=torch.int32, device=dev),
                max_query_len=max(len(f) for f in feeds),
                max_seq_len=max(len(s) for s in seqs),
            )
            hidden = runner.forward(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), md)
            last = hidden[torch.tensor(starts[1:], device=dev) - 1]
            next_tokens = runner.model.compute_logits(last).float().argmax(-1).tolist()  # type: ignore[operator]
            for i, token in enumerate(next_tokens):
                outs[i].append(token)
                seqs[i].append(token)
                feeds[i] = [token]
    return outs
