"""Finding 2 of issue 17: anyone who reached a worker's port could call WorkerControl.Drain (it
took effect at once), GetWorkerInfo and GetTokenizer. Now the worker binds loopback unless told
otherwise, and answers WorkerControl only to routers with a fleet client certificate (mutual TLS;
tests/router/test_security.py) and to callers on its own host."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpu_worker.config import EngineConfig
from gpu_worker.server import ServerConfig, WorkerServer
from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc
from llmserve.v1 import internal_pb2 as ipb
from llmserve.v1 import internal_pb2_grpc as ipb_grpc
from tests.gpu_worker.server.worker_server_helpers import SERVED_NAME, collect, greedy
from tests.helpers.network import non_loopback_address


async def test_an_unauthenticated_remote_drain_is_refused_and_the_worker_keeps_serving(
    engine_config: EngineConfig,
) -> None:
    remote = non_loopback_address()
    server = WorkerServer(engine_config, ServerConfig(host="0.0.0.0", port=0))
    await server.start()
    await server.wait_ready()
    try:
        async with grpc.aio.insecure_channel(f"{remote}:{server.port}") as channel:
            control = ipb_grpc.WorkerControlStub(channel)
            for call in (control.Drain(ipb.DrainRequest(grace_period_s=1)),
                         control.GetWorkerInfo(ipb.GetWorkerInfoRequest()),
                         control.GetTokenizer(ipb.GetTokenizerRequest())):
                try:
                    await call
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                else:
                    raise AssertionError("a remote caller without a client certificate was served")
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING, "the Drain did not happen"
            out = await collect(pb_grpc.GenerationStub(channel).Generate(
                pb.GenerateRequest(model=SERVED_NAME, prompt="Hi", sampling=greedy(3))))
            assert out.finish == {0: "length"}, "the public API stays open"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as local:
            info = await ipb_grpc.WorkerControlStub(local).GetWorkerInfo(ipb.GetWorkerInfoRequest())
            assert info.model == SERVED_NAME and not info.draining  # the pod's own drain hook may
    finally:
        await server.drain(0.5)


def test_the_worker_binds_loopback_unless_told_otherwise() -> None:
    from gpu_worker.__main__ import build_parser, configs_from_args

    args = build_parser({}).parse_args(["--model", "m"])
    _, server_config = configs_from_args(args)
    assert server_config.host == "127.0.0.1" and not server_config.allow_remote_control
    args = build_parser({"LLMSERVE_HOST": "0.0.0.0"}).parse_args(["--model", "m"])
    _, server_config = configs_from_args(args)
    assert server_config.host == "0.0.0.0"
