"""Benchmark result records: one JSON object per line in ``docs/benchmarks/results.jsonl``.

Required fields (shared/BASELINES.md): ``run_id``, ``date``, ``commit``, ``card``, ``workload``,
``model_shape``, ``engine``, ``output_tok_s``, and the engine configuration that makes two rows
of one run comparable: ``quantization`` (``none``, ``fp8``, ``w4a16``, ``gptq``, ``gguf``),
``kv_cache_dtype`` (``auto``, ``fp8``), ``tensor_parallel_size``, ``pipeline_parallel_size``;
``share_of_floor`` where a floor applies. Anything else (latencies, ratios, notes) is added as
extra keys; the GPU benchmarks add ``cost_per_million_output_tokens_usd`` at
``gpu_price_per_hour_usd`` (:func:`cost_per_million_output_tokens`).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_GPU_PRICE_PER_HOUR_USD = 2.69  # an H100-class card at a common cloud price (issue 18)


def cost_per_million_output_tokens(price_per_gpu_hour: float, gpus: int, output_tok_s: float) -> float | None:
    """What a million output tokens cost at ``output_tok_s``: price x GPUs x elapsed / output tokens
    x 1e6, with elapsed / output tokens = 1 / ``output_tok_s`` (None without throughput). It prices
    the whole wall time of the run, idle or not."""
    if output_tok_s <= 0:
        return None
    return price_per_gpu_hour * gpus * 1e6 / (3600.0 * output_tok_s)


def new_run_id() -> str:
    """A sortable, unique id: UTC time plus a random suffix."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]


def today() -> str:
    return dt.datetime.now(dt.timezone.utc).date().isoformat()


@dataclass(frozen=True)
class ResultRow:
    """One measured (workload, model shape, engine) on one card."""

    run_id: str
    date: str
    commit: str
    card: str
    workload: str
    model_shape: str
    engine: str
    output_tok_s: float
    extra: dict[str, Any] = field(default_factory=dict)
    quantization: str = "none"
    kv_cache_dtype: str = "auto"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    def to_json(self) -> str:
        row = asdict(self)
        extra = row.pop("extra")
        row["output_tok_s"] = round(self.output_tok_s, 2)
        row.update(extra)
        return json.dumps(row, sort_keys=False)


def append_results(path: Path, rows: Iterable[ResultRow]) -> int:
    """Append ``rows`` as JSON lines to ``path`` (created with its folder if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [row.to_json() for row in rows]
    with path.open("a", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    return len(lines)


def read_results(path: Path) -> list[dict[str, Any]]:
    """Every record of a results file (blank lines skipped)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
