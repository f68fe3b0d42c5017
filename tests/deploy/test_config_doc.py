"""docs/CONFIG.md lists every flag of the router and the worker with its LLMSERVE_* variable."""

from __future__ import annotations

import re

import pytest

from tests.deploy.deploy_manifests import ROOT, help_flags

CONFIG_DOC = ROOT / "docs" / "CONFIG.md"


def env_name(flag: str) -> str:
    """The documented rule: ``--max-num-seqs`` -> ``LLMSERVE_MAX_NUM_SEQS``."""
    return "LLMSERVE_" + flag.removeprefix("--").upper().replace("-", "_")


def _table_rows(section_title: str) -> list[str]:
    text = CONFIG_DOC.read_text()
    start = text.index(section_title)
    end = text.find("\n## ", start + 1)
    return [line for line in text[start:end if end != -1 else None].splitlines() if line.startswith("| `--")]


@pytest.mark.parametrize("entry_point,section", [
    ("llmserve-router", "## Router"),
    ("llmserve-worker", "## Worker"),
])
def test_every_help_flag_is_documented_with_its_variable(entry_point: str, section: str) -> None:
    rows = _table_rows(section)
    documented: dict[str, str] = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        for flag in re.findall(r"`(--[a-z0-9-]+)`", cells[0]):
            if not flag.startswith("--no-"):  # one variable for a --x / --no-x pair
                documented[flag] = cells[1]
    flags = {f for f in help_flags(entry_point) if f != "--help" and not f.startswith("--no-")}
    missing = sorted(flags - set(documented))
    assert not missing, f"docs/CONFIG.md {section!r} lacks {missing}"
    for flag, cell in documented.items():
        assert cell == f"`{env_name(flag)}`", f"{flag}: documented variable {cell}"


def test_env_rule_examples() -> None:
    assert env_name("--redis-url") == "LLMSERVE_REDIS_URL"
    assert env_name("--gpu-memory-utilization") == "LLMSERVE_GPU_MEMORY_UTILIZATION"
