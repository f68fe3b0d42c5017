"""The router never imports torch; only llmserve.fleet.redis_store imports redis."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import router, router.server, router.__main__, llmserve.fleet
assert 'torch' not in sys.modules, 'router imported torch'
assert 'redis' not in sys.modules, 'llmserve.fleet imported redis outside redis_store'
import llmserve.fleet.redis_store
assert 'torch' not in sys.modules
print('ok')
"""


def test_router_and_fleet_import_without_torch() -> None:
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_router_cli_help_lists_policies() -> None:
    cmd = [sys.executable, "-m", "router", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "prefix,least-load,round-robin" in out.stdout
