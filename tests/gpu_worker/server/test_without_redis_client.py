"""A worker on an in-process fleet store (the one-process stack, ``llmserve up``) needs no Redis
client library: the GPU machine we benchmark on has none, and there the stack hung before it
was ready (the import failed inside the worker's load task). Run in a subprocess whose import
system refuses ``redis``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.gpu_worker.server.worker_server_helpers import ENGINE_ARGS

BLOCKER = '''
import sys


class _NoRedis:
    def find_spec(self, name, path=None, target=None):
        if name == "redis" or name.startswith("redis."):
            raise ModuleNotFoundError(f"No module named {name!r} (refused by the test)")
        return None


sys.meta_path.insert(0, _NoRedis())
'''

SCRIPT = '''
import asyncio, json, sys
from gpu_worker.config import EngineConfig
from gpu_worker.server import ServerConfig, WorkerServer
from llmserve.fleet import open_store


async def main() -> None:
    store = open_store(None)
    worker = WorkerServer(EngineConfig(model=sys.argv[1], **json.loads(sys.argv[2])),
                          ServerConfig(port=0), fleet_store=store)
    await worker.start()
    await asyncio.wait_for(worker.wait_ready(), 120)
    print("READY", "redis" in sys.modules, flush=True)
    await worker.drain(0.1)
    await store.close()


asyncio.run(main())
'''


def test_worker_on_an_in_process_store_starts_without_the_redis_client(tiny_model_dir: Path,
                                                                       tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    root = Path(__file__).resolve().parents[3]
    env = {"PYTHONPATH": f"{tmp_path}:{root}", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model_dir), json.dumps(ENGINE_ARGS)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "READY False" in proc.stdout, (proc.stdout[-1000:], proc.stderr[-3000:])
