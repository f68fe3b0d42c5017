"""The physical floors of W6 (bench/bench_long.py): model shapes, card ceilings, and the FLOPs and
bytes a long-context run cannot do without. Pure arithmetic, unit-tested against a hand
computation in tests/bench/test_bench_long.py."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shape:
    """A Llama model's sizes (untied embeddings)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int = 128256

    @property
    def linear_params(self) -> int:
        """Weights of the decoder layers' matrix products (q, k, v, o, gate, up, down)."""
        h, d = self.hidden, self.head_dim
        per_layer = h * (self.heads + 2 * self.kv_heads) * d + self.heads * d * h + 3 * h * self.intermediate
        return self.layers * per_layer

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    def weight_bytes_per_step(self, elem: int = 2) -> int:
        """Weights a decode step reads: every layer, the final norm and the lm_head; of the
        embedding only the batch's rows (not counted)."""
        return (self.linear_params + self.lm_head_params + self.norm_params) * elem

    def kv_bytes_per_token(self, elem: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * elem

    def hf_config(self) -> dict[str, Any]:
        return dict(hidden_size=self.hidden, intermediate_size=self.intermediate,
                    num_hidden_layers=self.layers, num_attention_heads=self.heads,
                    num_key_value_heads=self.kv_heads, head_dim=self.head_dim, vocab_size=self.vocab)


SHAPES = {  # BASELINES.md
    "llama3-8b": Shape(4096, 14336, 32, 32, 8, 128),
    "llama3-1b": Shape(2048, 8192, 16, 32, 8, 64),
}
SMOKE_SHAPE = Shape(64, 128, 2, 4, 2, 16, vocab=512)


@dataclass(frozen=True)
class Ceilings:
    matmul_tflops: float = 790.0
    copy_gbps: float = 4200.0
    source: str = "BASELINES.md (H200)"


@dataclass(frozen=True)
class Floors:
    """The physical floors of W6 for one shape at one card's ceilings (bf16 weights and K/V)."""

    shape: Shape
    ceilings: Ceilings

    def prompt_flops(self, length: int) -> float:
        """Matrix products (lm_head for the last token only) plus causal attention of one prompt."""
        s = self.shape
        matmul = 2.0 * s.linear_params * length + 2.0 * s.lm_head_params
        attention = s.layers * 2 * 2 * s.heads * s.head_dim * (length * (length + 1) / 2)
        return matmul + attention

    def prefill_s(self, prompt_lens: Sequence[int]) -> float:
        return sum(self.prompt_flops(n) for n in prompt_lens) / (self.ceilings.matmul_tflops * 1e12)

    def decode_step_s(self, kv_tokens: Sequence[int]) -> float:
        """One decode step whose requests attend over ``kv_tokens`` context tokens each."""
        nbytes = self.shape.weight_bytes_per_step() + sum(kv_tokens) * self.shape.kv_bytes_per_token()
        return nbytes / (self.ceilings.copy_gbps * 1e9)

    def lockstep_decode_s(self, prompt_lens: Sequence[int], output_tokens: int) -> float:
        """Output tokens 1 .. o-1 of every request decoded together (token 0 comes from prefill;
        token j reads the K/V of prompt + j tokens)."""
        return sum(self.decode_step_s([p + j for p in prompt_lens]) for j in range(1, output_tokens))

    def run_s(self, prompt_lens: Sequence[int], output_tokens: int) -> float:
        return self.prefill_s(prompt_lens) + self.lockstep_decode_s(prompt_lens, output_tokens)
