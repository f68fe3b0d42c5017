"""gRPC servicer of the router's public ``llmserve.v1.Generation``: decodes a request and runs it
through :class:`~router.generation.GenerationCore`, the path every front door shares.

The router serves the same service as a worker. Requests reach workers as ``prompt_token_ids``
(tokenized here, so every router hashes the same tokens the worker will cache) with the caller's
sampling parameters; a request id the client chose reaches the worker with a random suffix
(``generation.worker_request_id``: clients need not make theirs unique), and the worker's chunks come
back unchanged but for their ``request_id``, the client's own.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc

from llmserve.prompt_input import decode_prompt_input
from llmserve.v1 import generation_pb2 as gen_pb
from llmserve.v1 import generation_pb2_grpc as gen_grpc
from router.errors import InvalidRequest
from router.generation import GenerationCore, RouterRequest


class RouterServicer(gen_grpc.GenerationServicer):
    """Public ``llmserve.v1.Generation`` of the router."""

    def __init__(self, core: GenerationCore) -> None:
        self._core = core

    async def Generate(  # noqa: N802
        self, request: gen_pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gen_pb.GenerateResponse]:
        request_id = request.request_id or uuid.uuid4().hex  # a client's own id may not be unique
        with self._core.observe(request.model, request_id) as scope:
            if request.HasField("resume"):
                raise InvalidRequest("resume is internal: routers set it when they move a stream to "
                                     "another worker")
            routed = RouterRequest(
                model=request.model,
                prompt=decode_prompt_input(request, InvalidRequest),
                sampling=request.sampling,
                request_id=request_id,
                priority=request.priority if request.HasField("priority") else None,
                request_id_unique=not request.request_id,
                embed=request.task == gen_pb.TASK_EMBED,
                images=tuple(request.images),
            )
            async for chunk in scope.generate(routed, context.time_remaining):
                yield chunk

    async def ListModels(  # noqa: N802
        self, request: gen_pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> gen_pb.ListModelsResponse:
        models = await self._core.list_models()
        return gen_pb.ListModelsResponse(
            models=[gen_pb.ModelInfo(name=m.name, max_model_len=m.max_model_len, num_workers=m.num_workers,
                                     num_standby_workers=m.num_standby_workers, quantization=m.quantization,
                                     kv_cache_dtype=m.kv_cache_dtype, weight_bytes=m.weight_bytes,
                                     kv_cache_tokens=m.kv_cache_tokens, parent=m.parent)
                    for m in models]
        )
