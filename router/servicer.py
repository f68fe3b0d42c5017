"""gRPC servicer of the router: decodes requests, asks :class:`Router`, forwards the stream.

The router serves the public ``llmserve.v1.Generation`` service, like a worker. Requests reach
workers as ``prompt_token_ids`` (tokenized here, so every router hashes the same tokens the
worker will cache) with the caller's sampling parameters and request id.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc

from llmserve.prompt_input import decode_prompt_input
from llmserve.v1 import generation_pb2 as gen_pb
from llmserve.v1 import generation_pb2_grpc as gen_grpc
from router.dispatch import Dispatcher
from router.errors import InvalidRequest
from router.request_telemetry import RequestObservation, RouterTelemetry
from router.routing import Router


class RouterServicer(gen_grpc.GenerationServicer):
    """Public ``llmserve.v1.Generation`` of the router."""

    def __init__(self, router: Router, dispatcher: Dispatcher, telemetry: RouterTelemetry) -> None:
        self._router = router
        self._dispatcher = dispatcher
        self._telemetry = telemetry

    async def Generate(  # noqa: N802
        self, request: gen_pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gen_pb.GenerateResponse]:
        request_id = request.request_id or uuid.uuid4().hex
        with self._telemetry.observe(request.model, request_id) as obs:
            prompt = decode_prompt_input(request, InvalidRequest)
            model, workers = await self._router.resolve(request.model)
            obs.set_model(model)
            token_ids = await self._router.token_ids(model, workers, prompt)
            ranked = await self._router.rank(model, workers, token_ids, request_id)
            obs.on_ranked(ranked)
            forward = gen_pb.GenerateRequest(
                model=model,
                prompt_token_ids=gen_pb.TokenIds(ids=token_ids),
                sampling=request.sampling,
                request_id=request_id,
            )
            chunks = self._dispatcher.generate(forward, ranked.workers, context.time_remaining, obs)
            async for chunk in chunks:
                _observe_chunk(obs, chunk)
                yield chunk

    async def ListModels(  # noqa: N802
        self, request: gen_pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> gen_pb.ListModelsResponse:
        models = await self._router.list_models()
        return gen_pb.ListModelsResponse(
            models=[gen_pb.ModelInfo(name=m.name, max_model_len=m.max_model_len, num_workers=m.num_workers)
                    for m in models]
        )


def _observe_chunk(obs: RequestObservation, chunk: gen_pb.GenerateResponse) -> None:
    obs.on_chunk(bool(chunk.token_ids), chunk.finish_reason)
    if chunk.HasField("usage"):
        u = chunk.usage
        obs.on_usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                     cached_tokens=u.cached_prompt_tokens, worker_id=chunk.worker_id)
