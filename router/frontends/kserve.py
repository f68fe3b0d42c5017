"""The router's KServe v2 / Triton gRPC door: ``inference.GRPCInferenceService`` beside
``llmserve.v1.Generation`` on the router's gRPC port.

Each inference request is decoded (``kserve_requests``: Triton's vLLM-backend tensor names),
run through the shared :class:`~router.generation.GenerationCore` inside its own observation,
and the worker's chunks are written back as output tensors:

- ``ModelInfer`` (unary): one response with the whole completion (``stream`` must be false).
- ``ModelStreamInfer`` (bidirectional): any number of requests on one stream, served
  concurrently, at most ``max_stream_requests`` at once (``--max-kserve-stream-requests``: the
  stream reads no further request until one finishes, so a client that sends faster than it is
  served is slowed by flow control, never buffered); with ``stream`` true each chunk is one
  response, otherwise one response per request. Responses wait in a queue of at most
  ``max_stream_requests`` messages for the client to read them; a request whose response finds
  it full waits too, so a client that stops reading holds at most that much. Every response
  carries the request's ``id`` and the parameter
  ``triton_final_response`` (true on a request's last response). A request that fails gets one
  response with ``error_message`` set; the stream stays open for the others.

Errors of unary calls are gRPC statuses (INVALID_ARGUMENT for a bad tensor or parameter,
NOT_FOUND, UNAVAILABLE, RESOURCE_EXHAUSTED: the router's mapping). Cancelling a call (or the
stream) cancels its requests' calls to the workers, which abort them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc

from llmserve.kserve import grpc_service_pb2 as kserve_pb
from llmserve.kserve import grpc_service_pb2_grpc as kserve_grpc
from llmserve.v1 import generation_pb2 as gen_pb
from router.errors import InvalidRequest, ModelNotFound, RouterError, cancelled_by_caller
from router.frontends.kserve_requests import (
    FINISH_REASON,
    INPUTS,
    NUM_OUTPUT_TOKENS,
    OUTPUTS,
    TEXT_OUTPUT,
    InferCall,
    decode_infer,
)
from router.frontends.kserve_tensors import OutputWriter, TensorSpec
from router.generation import GenerationCore, RequestScope

log = logging.getLogger(__name__)

KSERVE_SERVICE = kserve_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
FINAL_RESPONSE = "triton_final_response"
MODEL_VERSION = "1"
PLATFORM = "llmserve"
_INTERNAL = "internal router error"
UNFINISHED = "None"  # finish_reason of a sequence still running, as Triton's vLLM backend sends it


@dataclass
class _Sequence:
    """What one of the ``n`` sequences produced (whole responses)."""

    texts: list[str] = field(default_factory=list)
    num_tokens: int = 0
    finish_reason: str = UNFINISHED


class KServeServicer(kserve_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over the router's :class:`GenerationCore`.

    ``serving`` is False while the router drains (ServerReady answers false); ``version`` is
    the server version of ServerMetadata; ``max_stream_requests``: requests of one
    ModelStreamInfer stream in flight at once, and its responses waiting to be read.
    """

    def __init__(self, core: GenerationCore, serving: Callable[[], bool], version: str,
                 max_stream_requests: int = 64) -> None:
        if max_stream_requests < 1:
            raise ValueError(f"max_kserve_stream_requests must be at least 1, got {max_stream_requests}")
        self._core = core
        self._serving = serving
        self._version = version
        self._max_stream_requests = max_stream_requests

    # -- health and metadata -----------------------------------------------------------------
    async def ServerLive(self, request: kserve_pb.ServerLiveRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> kserve_pb.ServerLiveResponse:
        return kserve_pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: kserve_pb.ServerReadyRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> kserve_pb.ServerReadyResponse:
        ready = self._serving() and bool(await self._core.list_models())
        return kserve_pb.ServerReadyResponse(ready=ready)

    async def ModelReady(self, request: kserve_pb.ModelReadyRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> kserve_pb.ModelReadyResponse:
        ready = self._serving() and await self._core.model_ready(request.name)
        return kserve_pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: kserve_pb.ServerMetadataRequest,  # noqa: N802
                             context: grpc.aio.ServicerContext) -> kserve_pb.ServerMetadataResponse:
        return kserve_pb.ServerMetadataResponse(name="llmserve", version=self._version,
                                                extensions=["parameters"])

    async def ModelMetadata(self, request: kserve_pb.ModelMetadataRequest,  # noqa: N802
                            context: grpc.aio.ServicerContext) -> kserve_pb.ModelMetadataResponse:
        live = [m.name for m in await self._core.list_models()]
        if request.name not in live:
            raise ModelNotFound(request.name, live)
        return kserve_pb.ModelMetadataResponse(
            name=request.name, versions=[MODEL_VERSION], platform=PLATFORM,
            inputs=[_tensor_metadata(spec) for spec in INPUTS],
            outputs=[_tensor_metadata(spec) for spec in OUTPUTS],
        )

    # -- inference ---------------------------------------------------------------------------
    async def ModelInfer(self, request: kserve_pb.ModelInferRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> kserve_pb.ModelInferResponse:
        request_id = _request_id()
        with self._core.observe(request.model_name, request_id) as scope:
            call = decode_infer(request, request_id)
            if call.stream:
                raise InvalidRequest("input 'stream' is true: streamed responses need ModelStreamInfer")
            last = None
            async for message in _responses(scope, call, context.time_remaining):
                last = message
            assert last is not None
            return last.infer_response

    async def ModelStreamInfer(  # noqa: N802
        self, request_iterator: AsyncIterator[kserve_pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[kserve_pb.ModelStreamInferResponse]:
        streams = _StreamMux(self._max_stream_requests)
        reader = asyncio.ensure_future(self._read(request_iterator, streams, context.time_remaining))
        try:
            while (message := await streams.next()) is not None:
                yield message
            reader.result()  # the request stream's own error, if any
        finally:
            reader.cancel()
            for task in list(streams.tasks):
                task.cancel()  # the client is gone: abort what is still running on workers
            for task in [reader, *streams.tasks]:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _read(self, request_iterator: AsyncIterator[kserve_pb.ModelInferRequest], streams: _StreamMux,
                    time_remaining: Callable[[], float | None]) -> None:
        try:
            async for request in request_iterator:
                await streams.start(self._serve_streamed(request, streams.queue.put, time_remaining))
        finally:
            streams.done_reading()

    async def _serve_streamed(self, request: kserve_pb.ModelInferRequest,
                              emit: Callable[[kserve_pb.ModelStreamInferResponse], Awaitable[None]],
                              time_remaining: Callable[[], float | None]) -> None:
        request_id = _request_id()
        try:
            with self._core.observe(request.model_name, request_id) as scope:
                call = decode_infer(request, request_id)
                async for message in _responses(scope, call, time_remaining):
                    await emit(message)  # waits while the client is behind: flow control, not memory
        except asyncio.CancelledError:
            if cancelled_by_caller():
                raise  # the stream is closing: nobody is left to tell
            await emit(_failed(request, "the request was interrupted: a call under it was cut; retry"))
        except Exception as exc:  # noqa: BLE001 - one failed request never ends the stream
            if not isinstance(exc, RouterError):
                log.error("KServe stream request failed", exc_info=exc)
            await emit(_failed(request, str(exc) if isinstance(exc, RouterError) else _INTERNAL))


class _StreamMux:
    """The requests of one ModelStreamInfer stream: their tasks (at most ``max_requests`` at
    once: :meth:`start` waits for a free place), and the queue their responses share (at most
    ``max_requests`` waiting, read with :meth:`next`)."""

    def __init__(self, max_requests: int) -> None:
        self.queue: asyncio.Queue[kserve_pb.ModelStreamInferResponse | None] = asyncio.Queue(max_requests)
        self.tasks: set[asyncio.Task[None]] = set()
        self._places = asyncio.Semaphore(max_requests)
        self._reading = True
        self._ended = False

    async def start(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await self._places.acquire()
        except BaseException:
            work.close()  # never started: no "coroutine was never awaited" warning
            raise
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self._places.release()
        self._maybe_end()

    def done_reading(self) -> None:
        self._reading = False
        self._maybe_end()

    async def next(self) -> kserve_pb.ModelStreamInferResponse | None:
        """The next response, or None once reading has ended, every request is done and every
        response was taken."""
        if self._ended and self.queue.empty():
            return None
        return await self.queue.get()

    def _maybe_end(self) -> None:
        if not self._reading and not self.tasks and not self._ended:
            self._ended = True
            if self.queue.empty():  # the reader may be waiting in get(): wake it (an empty queue has room)
                self.queue.put_nowait(None)


def _failed(request: kserve_pb.ModelInferRequest, error: str) -> kserve_pb.ModelStreamInferResponse:
    """The one response of a streamed request that failed."""
    failed = kserve_pb.ModelStreamInferResponse(error_message=error)
    failed.infer_response.model_name = request.model_name
    failed.infer_response.id = request.id
    failed.infer_response.parameters[FINAL_RESPONSE].bool_param = True
    return failed


def _request_id() -> str:
    # Client ids need not be unique (Triton's examples reuse "1"): the router's own id is.
    return f"kserve-{uuid.uuid4().hex}"


async def _responses(
    scope: RequestScope, call: InferCall, time_remaining: Callable[[], float | None]
) -> AsyncIterator[kserve_pb.ModelStreamInferResponse]:
    """The responses of one request (as stream messages; a unary call returns the last one's
    ``infer_response``): one per chunk when streaming, else one in all."""
    chunks = scope.generate(call.routed, time_remaining)
    if call.stream:
        async for chunk in chunks:
            final = chunk.HasField("usage")  # the stream's last chunk carries the usage
            yield _response(scope, call, [(chunk.text, len(chunk.token_ids), _finish(chunk))], final)
        return
    sequences: dict[int, _Sequence] = {}
    async for chunk in chunks:
        seq = sequences.setdefault(chunk.index, _Sequence())
        seq.texts.append(chunk.text)
        seq.num_tokens += len(chunk.token_ids)
        if chunk.finish_reason:
            seq.finish_reason = chunk.finish_reason
    outputs = [(call.prompt_text + "".join(s.texts), s.num_tokens, s.finish_reason)
               for _, s in sorted(sequences.items())]
    yield _response(scope, call, outputs, final=True)


def _finish(chunk: gen_pb.GenerateResponse) -> str:
    return chunk.finish_reason or UNFINISHED


def _response(scope: RequestScope, call: InferCall, sequences: list[tuple[str, int, str]],
              final: bool) -> kserve_pb.ModelStreamInferResponse:
    """One response: the asked-for outputs, one element per sequence (built in place in its
    stream message: no copy)."""
    message = kserve_pb.ModelStreamInferResponse()
    response = message.infer_response
    response.model_name = scope.model or call.model_name
    response.model_version = MODEL_VERSION
    response.id = call.client_id
    response.parameters[FINAL_RESPONSE].bool_param = final
    writer = OutputWriter(response)
    for name in call.outputs:
        if name == TEXT_OUTPUT:
            writer.add_bytes(name, [text.encode() for text, _, _ in sequences])
        elif name == FINISH_REASON:
            writer.add_bytes(name, [reason.encode() for _, _, reason in sequences])
        elif name == NUM_OUTPUT_TOKENS:
            writer.add_uint32(name, [count for _, count, _ in sequences])
    return message


def _tensor_metadata(spec: TensorSpec) -> kserve_pb.ModelMetadataResponse.TensorMetadata:
    return kserve_pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype,
                                                         shape=list(spec.shape))
