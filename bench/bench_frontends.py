"""What do the router's front doors cost? 64 concurrent streams through each door, one run.

Starts ``llmserve up`` (router with the OpenAI HTTP door + one CPU worker, in one process, as a
user starts it) and sends the same workload through each door in turn, in rounds whose order
rotates (native, OpenAI, KServe; OpenAI, KServe, native; ...) so drift hits every door alike:

- native: ``llmserve.v1.Generation/Generate`` streams (grpc.aio);
- OpenAI: ``POST /v1/completions`` with ``"stream": true`` (server-sent events), read by a
  minimal asyncio HTTP/1.1 client;
- KServe: ``inference.GRPCInferenceService/ModelStreamInfer`` with ``stream`` true, one bidi
  stream per request, ``sampling_parameters`` JSON (grpc.aio, our generated stubs).

Clients are lean on purpose (no SDK objects per chunk): the client runs on the same cores as the
server, and what is measured is the door, not a client library. Every request: a distinct
text prompt of ``--prompt-words`` words (no prefix-cache hits across requests), greedy,
``ignore_eos``, ``max_tokens``; each must produce exactly ``max_tokens`` tokens. Prints per door
the output tokens per second (total tokens / wall time of its rounds), TTFT p50/p99, the ratio
to native gRPC, and the CPU time the ``llmserve up`` process and this client spent per 1000
output tokens (on a shared machine, CPU per token is steadier than throughput: other load
slows a round's wall time, hardly its CPU time).

    python bench/bench_frontends.py --model smollm2-135m --num-requests 64 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
MODEL = "bench"
DOORS = ("native", "openai", "kserve")


@dataclass(frozen=True)
class Outcome:
    """One request: output tokens, time to first token, end."""

    tokens: int
    ttft_s: float


@dataclass
class DoorResult:
    name: str
    tokens: int = 0
    seconds: float = 0.0
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    ttfts: list[float] = field(default_factory=list)

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def cpu_ms_per_1k(self, cpu_s: float) -> float:
        return 1e6 * cpu_s / self.tokens if self.tokens else 0.0

    def ttft_ms(self, q: float) -> float:
        ordered = sorted(self.ttfts)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_prompts(num: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    syllables = ("bcdfghklmnprstvz", "aeiou", "lmnrst")
    vocab = ["".join(rng.choice(letters) for letters in syllables) for _ in range(500)]
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(num)]


# -- the three clients ----------------------------------------------------------------------
async def native_request(channel: grpc.aio.Channel, prompt: str, max_tokens: int) -> Outcome:
    from llmserve.v1 import generation_pb2 as pb
    from llmserve.v1 import generation_pb2_grpc as pb_grpc

    request = pb.GenerateRequest(model=MODEL, prompt=prompt, sampling=pb.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    start = time.perf_counter()
    ttft, tokens = 0.0, 0
    async for chunk in pb_grpc.GenerationStub(channel).Generate(request):
        if chunk.token_ids and not tokens:
            ttft = time.perf_counter() - start
        tokens += len(chunk.token_ids)
    return Outcome(tokens, ttft)


async def openai_request(port: int, prompt: str, max_tokens: int) -> Outcome:
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                 b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    status = await reader.readline()
    assert b" 200 " in status, status
    while (await reader.readline()) not in (b"\r\n", b""):
        pass  # headers
    ttft, tokens = 0.0, 0
    buffer = b""
    while True:
        size_line = await reader.readline()  # chunked transfer encoding
        size = int(size_line.strip() or b"0", 16)
        if size == 0:
            break
        buffer += await reader.readexactly(size)
        await reader.readexactly(2)  # the chunk's CRLF
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            data = event.removeprefix(b"data: ")
            if data == b"[DONE]":
                continue
            obj = json.loads(data)
            if obj["choices"] and not ttft:
                ttft = time.perf_counter() - start
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
    writer.close()
    return Outcome(tokens, ttft)


async def kserve_request(channel: grpc.aio.Channel, prompt: str, max_tokens: int) -> Outcome:
    from llmserve.kserve import grpc_service_pb2 as kpb
    from llmserve.kserve import grpc_service_pb2_grpc as kgrpc

    def tensor(name: str, datatype: str, raw: bytes) -> tuple[object, bytes]:
        return kpb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=[1]), raw

    def as_bytes(value: bytes) -> bytes:
        return len(value).to_bytes(4, "little") + value

    sampling = json.dumps({"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}).encode()
    pairs = [tensor("text_input", "BYTES", as_bytes(prompt.encode())), tensor("stream", "BOOL", b"\x01"),
             tensor("sampling_parameters", "BYTES", as_bytes(sampling)),
             tensor("return_num_output_tokens", "BOOL", b"\x01")]
    request = kpb.ModelInferRequest(model_name=MODEL, inputs=[t for t, _ in pairs],
                                    raw_input_contents=[r for _, r in pairs])

    async def one_request():  # type: ignore[no-untyped-def]
        yield request

    start = time.perf_counter()
    ttft, tokens = 0.0, 0
    async for message in kgrpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(one_request()):
        assert not message.error_message, message.error_message
        response = message.infer_response
        count = int.from_bytes(response.raw_output_contents[-1], "little")
        if count and not tokens:
            ttft = time.perf_counter() - start
        tokens += count
        if response.parameters["triton_final_response"].bool_param:
            break
    return Outcome(tokens, ttft)


# -- the run ---------------------------------------------------------------------------------
def start_stack(args: argparse.Namespace, grpc_port: int, http_port: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "llmserve.cli", "up", "--model", args.model, "--served-model-name", MODEL,
           "--port", str(grpc_port), "--worker-port", str(free_port()), "--http-port", str(http_port),
           "--max-num-seqs", str(args.num_requests), "--num-kv-blocks", str(args.num_kv_blocks),
           "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, cwd=REPO)
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"llmserve up exited with {proc.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return proc
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("llmserve up did not become SERVING")


async def run(
    args: argparse.Namespace, grpc_port: int, http_port: int, server_pid: int
) -> dict[str, DoorResult]:
    # One channel per gRPC door, shared by its concurrent requests (as a client process would);
    # HTTP/1.1 has no multiplexing: one connection per concurrent request.
    native_channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
    kserve_channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
    clients: dict[str, Callable[[str, int], Awaitable[Outcome]]] = {
        "native": lambda p, n: native_request(native_channel, p, n),
        "openai": lambda p, n: openai_request(http_port, p, n),
        "kserve": lambda p, n: kserve_request(kserve_channel, p, n),
    }
    for door in DOORS:  # warm-up: tokenizer fetch, channels, first compilations
        await clients[door](f"warm up {door}", 4)
    results = {door: DoorResult(door) for door in DOORS}
    for round_ in range(args.rounds):
        order = DOORS[round_ % len(DOORS):] + DOORS[:round_ % len(DOORS)]  # no door always first
        for door in order:
            seed = 1000 * round_ + DOORS.index(door)  # fresh prompts: no prefix-cache hits
            prompts = make_prompts(args.num_requests, args.prompt_words, seed=seed)
            server_cpu, client_cpu = process_cpu_s(server_pid), time.process_time()
            start = time.perf_counter()
            outcomes = await asyncio.gather(*(clients[door](p, args.max_tokens) for p in prompts))
            seconds = time.perf_counter() - start
            assert all(o.tokens == args.max_tokens for o in outcomes), [o.tokens for o in outcomes]
            r = results[door]
            r.tokens += sum(o.tokens for o in outcomes)
            r.seconds += seconds
            r.server_cpu_s += process_cpu_s(server_pid) - server_cpu
            r.client_cpu_s += time.process_time() - client_cpu
            r.ttfts += [o.ttft_s for o in outcomes]
            print(f"round {round_ + 1} {door:7s} {sum(o.tokens for o in outcomes) / seconds:8.1f} tok/s",
                  flush=True)
    await native_channel.close()
    await kserve_channel.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-kv-blocks", type=int, default=1024)
    args = parser.parse_args(argv)

    grpc_port, http_port = free_port(), free_port()
    proc = start_stack(args, grpc_port, http_port)
    try:
        results = asyncio.run(run(args, grpc_port, http_port, proc.pid))
    finally:
        proc.terminate()
        proc.wait(60)
    native = results["native"].tok_per_s
    print(f"\n{args.num_requests} concurrent streams x {args.rounds} rounds, {args.max_tokens} tokens each, "
          f"{args.model}, {platform.machine()} {os.cpu_count()} CPUs")
    print(f"{'door':8s} {'tok/s':>8s} {'TTFT p50 ms':>12s} {'TTFT p99 ms':>12s} {'vs native':>10s} "
          f"{'server CPU ms/1k tok':>21s} {'client CPU ms/1k tok':>21s}")
    for door in DOORS:
        r = results[door]
        print(f"{door:8s} {r.tok_per_s:8.1f} {r.ttft_ms(0.5):12.0f} {r.ttft_ms(0.99):12.0f} "
              f"{r.tok_per_s / native:10.3f} {r.cpu_ms_per_1k(r.server_cpu_s):21.0f} "
              f"{r.cpu_ms_per_1k(r.client_cpu_s):21.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
