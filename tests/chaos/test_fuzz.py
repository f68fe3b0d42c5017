"""Property-based fuzzing of ``GenerateRequest`` (hypothesis): random requests, valid and hostile,
through a real router and straight to a real worker process (the chaos suite's fleet, after its
scenarios). Each gets OK or a clean INVALID_ARGUMENT / RESOURCE_EXHAUSTED (NOT_FOUND for an
unknown model name), never INTERNAL, never a hang; afterwards every worker is idle with every KV
block free, and still serves.

The examples are derandomized (the same ones on every run) and sized for CI; raise
``LLMSERVE_FUZZ_EXAMPLES`` for longer runs."""

from __future__ import annotations

import asyncio
import collections
import os
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings

from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc
from llmserve.v1 import internal_pb2 as ipb
from llmserve.v1 import internal_pb2_grpc as ipb_grpc
from tests.chaos.fuzz import generate_requests
from tests.chaos.harness import MODEL, Figures, Fleet, record

pytestmark = pytest.mark.chaos
EXAMPLES = int(os.environ.get("LLMSERVE_FUZZ_EXAMPLES", "800"))
ROUTER_EXAMPLES = max(1, EXAMPLES // 4)
CLEAN = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ_SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.function_scoped_fixture])


def _call(stub: pb_grpc.GenerationStub, request: pb.GenerateRequest) -> tuple[grpc.StatusCode, str, list]:
    try:
        return grpc.StatusCode.OK, "", list(stub.Generate(request, timeout=60))
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", []


def _check(request: pb.GenerateRequest, valid: bool, code: grpc.StatusCode, details: str, chunks: list,
           unknown_model: str) -> None:
    """One fuzzed request's answer is clean (see the module docstring); a valid one is served."""
    assert code == grpc.StatusCode.OK or not valid, f"a valid request was refused: {code.name}: {details}"
    if request.model == unknown_model:
        assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), (code, details)
        return
    assert code in CLEAN, f"{code.name}: {details}\n{request}"
    if code != grpc.StatusCode.OK:
        assert details and "Traceback" not in details
        return
    sampling = request.sampling
    n = sampling.n if sampling.HasField("n") else 1
    max_tokens = sampling.max_tokens if sampling.HasField("max_tokens") else 16
    tokens = collections.Counter[int]()
    finished = {c.index for c in chunks if c.finish_reason}
    for chunk in chunks:
        tokens[chunk.index] += len(chunk.token_ids)
        assert chunk.request_id == chunks[0].request_id
    assert finished == set(range(n)), f"sequences without an end: {request}"
    assert all(count <= max_tokens for count in tokens.values())
    assert chunks[-1].HasField("usage") and chunks[-1].usage.completion_tokens >= sum(tokens.values())


def _wait_idle(target: str, timeout_s: float = 60.0) -> ipb.LoadReport:
    with grpc.insecure_channel(target) as channel:
        control = ipb_grpc.WorkerControlStub(channel)
        deadline = time.monotonic() + timeout_s
        while True:
            load = control.GetWorkerInfo(ipb.GetWorkerInfoRequest(), timeout=10).load
            if load.num_running + load.num_waiting == 0 and load.num_free_kv_blocks == load.num_kv_blocks:
                return load
            assert time.monotonic() < deadline, f"the worker did not return to idle: {load}"
            time.sleep(0.05)


def _still_serves(target: str, model: str) -> None:
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        request = pb.GenerateRequest(model=model, prompt="Still alive?", sampling=pb.SamplingParams(
            max_tokens=4, temperature=0.0, ignore_eos=True))
        chunks = list(pb_grpc.GenerationStub(channel).Generate(request, timeout=60))
        assert sum(len(c.token_ids) for c in chunks) == 4


def _figures(name: str, codes: collections.Counter[str], seconds: float) -> Figures:
    ok = codes.get("OK", 0)
    return Figures(name, sum(codes.values()), ok, 0, 0, sum(codes.values()) - ok, 0, 0, round(seconds, 1),
                   notes=", ".join(f"{c} {k}" for c, k in sorted(codes.items())))


def _fuzz(target: str, examples: int) -> collections.Counter[str]:
    """``examples`` fuzzed requests to ``target``, each checked; the status codes seen."""
    codes: collections.Counter[str] = collections.Counter()
    with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)]) as channel:
        stub = pb_grpc.GenerationStub(channel)

        @settings(max_examples=examples, **FUZZ_SETTINGS)  # type: ignore[arg-type]
        @given(case=generate_requests(MODEL))
        def one(case: tuple[pb.GenerateRequest, bool]) -> None:
            code, details, chunks = _call(stub, case[0])
            codes[code.name] += 1
            _check(*case, code, details, chunks, "no-such-model")

        one()
    return codes


def test_fuzzed_requests_through_a_router(chaos_fleet: Fleet) -> None:
    asyncio.run(chaos_fleet.check_ready())
    start = time.monotonic()
    codes = _fuzz(chaos_fleet.targets[0], ROUTER_EXAMPLES)
    asyncio.run(chaos_fleet.check_ready())  # every worker idle, every KV block free
    _still_serves(chaos_fleet.targets[0], MODEL)
    record(_figures(f"fuzz: {ROUTER_EXAMPLES} GenerateRequests through a router", codes,
                    time.monotonic() - start))
    assert codes["OK"] > ROUTER_EXAMPLES // 4 and codes["INVALID_ARGUMENT"] > ROUTER_EXAMPLES // 5


def test_fuzzed_requests_to_a_worker(chaos_fleet: Fleet) -> None:
    """Straight to a worker (a worker also serves clients without a router)."""
    asyncio.run(chaos_fleet.check_ready())
    worker = next(iter(chaos_fleet.workers.values()))
    start = time.monotonic()
    codes = _fuzz(worker.address, EXAMPLES)
    load = _wait_idle(worker.address)
    assert load.num_free_kv_blocks == load.num_kv_blocks  # no KV block leaked
    _still_serves(worker.address, MODEL)
    asyncio.run(chaos_fleet.check_ready())
    record(_figures(f"fuzz: {EXAMPLES} GenerateRequests to a worker", codes, time.monotonic() - start))
    assert codes["OK"] > EXAMPLES // 4 and codes["INVALID_ARGUMENT"] > EXAMPLES // 5  # both kinds exercised
