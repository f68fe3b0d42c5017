"""The open-file limit the router's and worker's entry points raise for their connection
limits (``llmserve.open_files``), in child processes started with a low limit."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from llmserve.open_files import SPARE_FILES

_CHILD = """
import json, logging, resource, sys
soft, hard = (int(x) for x in sys.argv[1:3])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger().addHandler(Keep(logging.WARNING))
from llmserve.open_files import raise_open_file_limit
now = raise_open_file_limit(int(sys.argv[3]))
soft_now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
print(json.dumps({"returned": now, "soft": soft_now, "warnings": records}))
"""


@pytest.fixture
def hard_limit() -> Iterator[int]:
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"this machine's hard open-file limit is {hard}")
    yield hard


def _child(soft: int, hard: int, connections: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(soft), str(hard), str(connections)],
                         capture_output=True, text=True, timeout=60, check=True)
    return dict(json.loads(out.stdout))


def test_the_soft_open_file_limit_is_raised_to_what_the_connections_need(hard_limit: int) -> None:
    raised = _child(256, hard_limit, 1000)
    assert raised["returned"] == raised["soft"] == 1000 + SPARE_FILES
    assert raised["warnings"] == []
    kept = _child(3000, hard_limit, 100)  # never lowered
    assert kept["soft"] == 3000 and kept["warnings"] == []


def test_a_hard_limit_too_low_is_raised_to_and_warned_about(hard_limit: int) -> None:
    capped = _child(256, 2000, 4096)
    assert capped["soft"] == 2000
    (warning,) = capped["warnings"]
    assert "open-file limit is 2000" in warning and "--max-grpc-connections" in warning
