"""Each rank reads only its slices of a sharded safetensors checkpoint: while loading, its peak
resident memory grows by about half of what one rank loading the whole model needs (TP=2)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.tiny_models import make_tiny_model

REPO = Path(__file__).resolve().parents[3]
# ~48 M float32 parameters (~190 MB) in 40 MB shards: large enough that the weights, not the
# interpreter, decide the growth.
SHAPE = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, vocab_size=32000)
SCRIPT = """
import sys
from llmserve.telemetry.logging import configure_logging
configure_logging("INFO")  # the ranks log the same way (their load line is what is measured)
from gpu_worker import LLM
with LLM(model=sys.argv[1], tensor_parallel_size=int(sys.argv[2]), skip_tokenizer_init=True, num_kv_blocks=8,
         max_num_seqs=2, max_num_batched_tokens=64, enforce_eager=True) as llm:
    pass
"""


def grown_mib(model: Path, tp: int) -> dict[int, int]:
    """Rank -> MiB its peak resident memory grew by while loading its shard."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(model), str(tp)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.findall(r"rank (\d+) loaded its model shard: .* grew by (\d+) MiB", proc.stderr)
    return {int(rank): int(mib) for rank, mib in found}


@pytest.mark.slow
def test_each_rank_holds_about_half(tmp_path: Path) -> None:
    model = make_tiny_model("llama", tmp_path / "m", max_shard_size="40MB", **SHAPE)
    assert len(list(model.glob("*.safetensors"))) > 2
    whole = grown_mib(model, 1)[0]
    halves = grown_mib(model, 2)
    assert whole > 150 and sorted(halves) == [0, 1], (whole, halves)
    for rank, mib in halves.items():
        assert mib < 0.65 * whole, (rank, mib, whole)
