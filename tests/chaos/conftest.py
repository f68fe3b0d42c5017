"""One fleet for the whole chaos suite (tests/chaos/): redis-server (append-only file on), three
``python -m gpu_worker`` workers on the tiny random llama and two ``python -m router`` routers,
each its own process.

The scenarios run one after the other on the same fleet, so the fleet must survive each of them
and serve the next correctly: a Redis kill, a frozen worker, slow readers, a SIGKILLed worker
(which leaves the fleet with two workers: it runs last in test_chaos.py), then the fuzzing. Each
test starts by checking the fleet is whole and idle. Starting one fleet instead of one per
scenario keeps the suite within a few minutes on a 2-core runner.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.harness import Fleet, start_fleet

# Room for the 1,000-stream load: 1,024 blocks of 16 tokens per worker, 256 running sequences.
WORKER_ARGS = ("--num-kv-blocks", "1024", "--max-num-seqs", "256", "--max-queue-len", "1024")


@pytest.fixture(scope="session")
def chaos_fleet(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The suite's fleet (see the module docstring); stopped at the end of the session."""
    workdir: Path = tmp_path_factory.mktemp("chaos-fleet")
    fleet = asyncio.run(start_fleet(tiny_model("llama"), workdir, workers=3, routers=2,
                                    worker_args=WORKER_ARGS, persistence=True))
    yield fleet
    fleet.stop()
