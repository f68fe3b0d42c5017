"""gRPC servicers: the only place where protobuf meets the worker's domain objects.

``GenerationServicer`` (public ``llmserve.v1.Generation``) and ``WorkerControlServicer``
(internal ``llmserve.v1.WorkerControl``) decode requests into domain objects, call
:class:`~gpu_worker.server.service.WorkerService`, and encode its results. Errors are
raised as exceptions and mapped to statuses by the interceptor.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import aclosing
from typing import Any, cast

import grpc

from gpu_worker.beam_search import served_beam_params
from gpu_worker.sampling_params import PluginCall, SamplingParams
from gpu_worker.server.errors import InvalidRequest
from gpu_worker.server.service import WorkerService, WorkerSnapshot
from gpu_worker.server.types import GenerateCall
from llmserve.limits import LimitExceeded, RequestLimits
from llmserve.prompt_input import decode_prompt_input
from llmserve.sampling_extras import check_sampling_limits
from llmserve.v1 import generation_pb2 as gen_pb
from llmserve.v1 import generation_pb2_grpc as gen_grpc
from llmserve.v1 import internal_pb2 as int_pb
from llmserve.v1 import internal_pb2_grpc as int_grpc

# proto3 `optional` scalars of SamplingParams, passed on only when set (else vLLM defaults).
_OPTIONAL_SAMPLING_FIELDS = (
    "n",
    "max_tokens",
    "min_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "include_stop_str_in_output",
    "ignore_eos",
    "logprobs",
    "truncate_prompt_tokens",
    "prompt_logprobs",
)
# Prompt positions per message of `GenerateResponse.prompt_logprobs`: a message stays far below
# max_message_bytes (16 MiB) whatever the prompt (1024 positions with 20 alternatives: ~0.4 MB;
# all of a 128k-token prompt's in one message: ~50 MB).
PROMPT_LOGPROBS_PER_MESSAGE = 1024


def decode_sampling(msg: gen_pb.SamplingParams, *, resumed: bool = False) -> SamplingParams:
    """Proto sampling params -> domain ``SamplingParams`` (ValueError names a bad field).

    ``resumed``: the request continues a stream another worker started (``GenerateRequest.resume``)."""
    kwargs: dict[str, Any] = {
        name: getattr(msg, name) for name in _OPTIONAL_SAMPLING_FIELDS if msg.HasField(name)
    }
    if resumed:
        # The client already has the prompt's logprobs, from the worker that started the stream
        # (a router resumes only a stream that relayed all of them): sent again, they would repeat.
        kwargs.pop("prompt_logprobs", None)
    kwargs["stop"] = list(msg.stop)
    kwargs["stop_token_ids"] = list(msg.stop_token_ids)
    kwargs["logit_bias"] = dict(msg.logit_bias)
    if msg.allowed_token_ids:  # empty: every token (a repeated field has no unset state)
        kwargs["allowed_token_ids"] = list(msg.allowed_token_ids)
    kwargs["bad_words"] = list(msg.bad_words)
    if msg.HasField("structured_output"):
        kwargs["structured_output"] = decode_structured_output(msg.structured_output)
    kwargs["logits_processors"] = [decode_plugin_call("logits_processors", c) for c in msg.logits_processors]
    kwargs["stopping_criteria"] = [decode_plugin_call("stopping_criteria", c) for c in msg.stopping_criteria]
    return SamplingParams(**kwargs)


def decode_structured_output(msg: gen_pb.StructuredOutput) -> dict[str, Any]:
    """The oneof as ``SamplingParams.structured_output`` takes it (``{"json": schema}``, ...)."""
    kind = msg.WhichOneof("kind")
    if kind is None:
        raise InvalidRequest("structured_output: set one of json, regex, grammar, choice, json_object")
    if kind == "choice":
        return {"choice": list(msg.choice.choices)}
    return {kind: getattr(msg, kind)}


def decode_plugin_call(field: str, msg: gen_pb.PluginCall) -> PluginCall:
    """A plug-in call; its arguments are parsed as JSON (data only, never evaluated)."""
    try:
        args = json.loads(msg.args_json) if msg.args_json else None
    except ValueError as exc:
        raise InvalidRequest(f"{field}: args_json of {msg.name!r} is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest(f"{field}: args_json of {msg.name!r} is nested too deeply") from None
    return PluginCall(msg.name, args)


def decode_generate(request: gen_pb.GenerateRequest, limits: RequestLimits | None = None) -> GenerateCall:
    """A GenerateRequest as a domain call; a request id is generated when empty.

    With ``limits``, the request id, the number of images, ``n``, the stop strings, the
    structured-output format's size and nesting and the input's turns and characters are checked
    first (``LimitExceeded``), before anything is copied, parsed, templated or tokenized."""
    if limits is not None:
        limits.check_request_id(request.request_id)
        limits.check_images(len(request.images))
        check_sampling_limits(limits, request.sampling)
    resumed = tuple(request.resume.output_token_ids) if request.HasField("resume") else ()
    params = decode_sampling(request.sampling, resumed=request.HasField("resume"))
    beam = None
    if request.sampling.HasField("beam_search"):
        if resumed or request.task == gen_pb.TASK_EMBED or request.images:
            raise InvalidRequest("beam_search: not served with resume, TASK_EMBED or images")
        search = request.sampling.beam_search
        length_penalty = search.length_penalty if search.HasField("length_penalty") else 1.0
        beam = served_beam_params(params, search.beam_width, length_penalty)
    return GenerateCall(
        model=request.model,
        prompt=decode_prompt_input(request, InvalidRequest, limits),
        params=params,
        request_id=request.request_id or uuid.uuid4().hex,
        resumed_token_ids=resumed,
        priority=request.priority,
        embed=request.task == gen_pb.TASK_EMBED,
        images=tuple(request.images),
        beam=beam,
    )


def _rank_key(item: tuple[int, Any]) -> int:
    rank = item[1].rank
    return rank if rank is not None else 1 << 30


def encode_logprobs(
    token_ids: list[int], logprobs: list[dict[int, Any]], top_n: int
) -> list[gen_pb.TokenLogprobs]:
    """Engine logprob dicts (token id -> Logprob) -> one TokenLogprobs per new token."""
    encoded = []
    for token_id, by_id in zip(token_ids, logprobs, strict=False):
        chosen = by_id.get(token_id)
        ranked = sorted(by_id.items(), key=_rank_key)[:top_n]
        encoded.append(
            gen_pb.TokenLogprobs(
                token_id=token_id,
                logprob=chosen.logprob if chosen is not None else 0.0,
                rank=(chosen.rank or 0) if chosen is not None else 0,
                top=[
                    gen_pb.TopLogprob(token_id=tid, logprob=lp.logprob, token=lp.decoded_token or "")
                    for tid, lp in ranked
                ],
            )
        )
    return encoded


def encode_prompt_logprobs(
    request_id: str, prompt_token_ids: Sequence[int], prompt_logprobs: Sequence[dict[int, Any] | None],
    top_n: int,
) -> Iterator[gen_pb.GenerateResponse]:
    """The prompt's logprobs (vLLM's list, the first entry None) as messages of at most
    :data:`PROMPT_LOGPROBS_PER_MESSAGE` positions each, from the second prompt token on; each piece
    is encoded when the caller asks for its message."""
    positions = len(prompt_token_ids)
    for start in range(1, positions, PROMPT_LOGPROBS_PER_MESSAGE):
        end = min(start + PROMPT_LOGPROBS_PER_MESSAGE, positions)
        by_id = cast(list[dict[int, Any]], prompt_logprobs[start:end])  # only the first entry is None
        yield gen_pb.GenerateResponse(
            request_id=request_id,
            prompt_logprobs=encode_logprobs(list(prompt_token_ids[start:end]), by_id, top_n),
        )


class _StreamEncoder:
    """Turns one request's delta RequestOutputs into GenerateResponse chunks."""

    def __init__(self, call: GenerateCall, worker_id: str) -> None:
        self._call = call
        self._worker_id = worker_id
        self._completion_tokens = len(call.resumed_token_ids)  # usage covers the whole stream
        self._prompt_logprobs_sent = False

    def encode(self, output: Any) -> Iterator[gen_pb.GenerateResponse]:
        """The messages of one delta output: the prompt's logprobs first when it carries them
        (the first time only), then one chunk per sequence with news. An embedding request has
        one message: its embedding and usage (the token its step "sampled" is not shown)."""
        if self._call.embed:
            if output.finished:
                yield self._embedding(output)
            return
        prompt_logprobs = getattr(output, "prompt_logprobs", None)
        if prompt_logprobs is not None and not self._prompt_logprobs_sent:
            self._prompt_logprobs_sent = True
            yield from encode_prompt_logprobs(output.request_id, output.prompt_token_ids or (),
                                              prompt_logprobs, self._call.params.prompt_logprobs or 0)
        yield from self._chunks(output)

    def _embedding(self, output: Any) -> gen_pb.GenerateResponse:
        message = gen_pb.GenerateResponse(request_id=output.request_id, finish_reason="stop",
                                          embedding=output.embedding or (), worker_id=self._worker_id)
        message.usage.CopyFrom(gen_pb.Usage(
            prompt_tokens=len(output.prompt_token_ids or ()),
            cached_prompt_tokens=output.num_cached_tokens or 0,
            device_seconds=getattr(output, "device_s", 0.0),
        ))
        return message

    def _chunks(self, output: Any) -> list[gen_pb.GenerateResponse]:
        chunks = []
        top_n = self._call.params.logprobs or 0
        for seq in output.outputs:
            token_ids = list(seq.token_ids)
            self._completion_tokens += len(token_ids)
            chunk = gen_pb.GenerateResponse(
                request_id=output.request_id,
                index=seq.index,
                text=seq.text,
                token_ids=token_ids,
                finish_reason=_finish_reason(seq.finish_reason),
                stop_reason="" if seq.stop_reason is None else str(seq.stop_reason),
            )
            if isinstance(seq.stop_reason, int):  # a stop token id, typed (a stop string is text)
                chunk.stop_token_id = seq.stop_reason
            if seq.logprobs:
                chunk.logprobs.extend(encode_logprobs(token_ids, seq.logprobs, top_n))
            chunks.append(chunk)
        if output.finished:
            if not chunks:
                chunks.append(gen_pb.GenerateResponse(request_id=output.request_id))
            chunks[-1].usage.CopyFrom(
                gen_pb.Usage(
                    prompt_tokens=len(output.prompt_token_ids or ()),
                    completion_tokens=self._completion_tokens,
                    cached_prompt_tokens=output.num_cached_tokens or 0,
                    device_seconds=getattr(output, "device_s", 0.0),
                )
            )
            chunks[-1].worker_id = self._worker_id
        return chunks


def _finish_reason(reason: Any) -> str:
    if reason is None:
        return ""
    return str(getattr(reason, "value", reason))


class GenerationServicer(gen_grpc.GenerationServicer):
    """Public ``llmserve.v1.Generation`` service of a worker."""

    def __init__(self, service: WorkerService) -> None:
        self._service = service

    async def Generate(  # noqa: N802
        self, request: gen_pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gen_pb.GenerateResponse]:
        # An async generator, not context.write: the tracing interceptor wraps only those.
        try:
            call = decode_generate(request, self._service.limits)
        except LimitExceeded as exc:
            self._service.on_refusal(exc.limit)
            raise
        encoder = _StreamEncoder(call, self._service.worker_id)
        async with aclosing(self._service.generate(call)) as outputs:
            async for output in outputs:
                for chunk in encoder.encode(output):
                    yield chunk

    async def ListModels(  # noqa: N802
        self, request: gen_pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> gen_pb.ListModelsResponse:
        return gen_pb.ListModelsResponse(
            models=[
                gen_pb.ModelInfo(name=m.name, max_model_len=m.max_model_len,
                                 num_workers=0 if m.standby else 1, num_standby_workers=int(m.standby),
                                 quantization=m.quantization, kv_cache_dtype=m.kv_cache_dtype,
                                 weight_bytes=m.weight_bytes, kv_cache_tokens=m.kv_cache_tokens,
                                 parent=m.parent)
                for m in self._service.list_models()
            ]
        )


def encode_worker_info(snap: WorkerSnapshot) -> int_pb.WorkerInfo:
    stats = snap.stats
    return int_pb.WorkerInfo(
        worker_id=snap.worker_id,
        model=snap.model,
        address=snap.address,
        block_size=snap.block_size,
        max_model_len=snap.max_model_len,
        draining=snap.draining,
        load=int_pb.LoadReport(
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            kv_usage=stats.kv_usage,
            max_num_seqs=snap.max_num_seqs,
            max_queue_len=snap.max_queue_len,
            num_kv_blocks=stats.num_total_blocks,
            num_free_kv_blocks=stats.num_free_blocks,
        ),
    )


class WorkerControlServicer(int_grpc.WorkerControlServicer):
    """Internal ``llmserve.v1.WorkerControl`` service (routers and operators only)."""

    def __init__(self, service: WorkerService, start_drain: Callable[[float], Awaitable[int]]) -> None:
        self._service = service
        self._start_drain = start_drain

    async def GetWorkerInfo(  # noqa: N802
        self, request: int_pb.GetWorkerInfoRequest, context: grpc.aio.ServicerContext
    ) -> int_pb.WorkerInfo:
        return encode_worker_info(self._service.snapshot())

    async def GetTokenizer(  # noqa: N802
        self, request: int_pb.GetTokenizerRequest, context: grpc.aio.ServicerContext
    ) -> int_pb.TokenizerFiles:
        files = await self._service.tokenizer_files()
        context.set_compression(grpc.Compression.Gzip)  # tokenizer.json shrinks about 4x
        return int_pb.TokenizerFiles(files=files, model=self._service.model_name)

    async def Drain(
        self, request: int_pb.DrainRequest, context: grpc.aio.ServicerContext
    ) -> int_pb.DrainResponse:  # noqa: N802
        if not 0 <= request.grace_period_s < math.inf:  # NaN fails both comparisons
            raise InvalidRequest(f"grace_period_s must be a finite number >= 0, got {request.grace_period_s}")
        in_flight = await self._start_drain(request.grace_period_s)
        return int_pb.DrainResponse(in_flight=in_flight)

    async def LoadLoraAdapter(  # noqa: N802
        self, request: int_pb.LoadLoraAdapterRequest, context: grpc.aio.ServicerContext
    ) -> int_pb.LoraAdapters:
        if not request.lora_name or not request.lora_path:
            raise InvalidRequest("lora_name and lora_path are required")
        adapters = await self._service.load_lora_adapter(request.lora_name, request.lora_path)
        return int_pb.LoraAdapters(adapters=adapters)

    async def UnloadLoraAdapter(  # noqa: N802
        self, request: int_pb.UnloadLoraAdapterRequest, context: grpc.aio.ServicerContext
    ) -> int_pb.LoraAdapters:
        if not request.lora_name:
            raise InvalidRequest("lora_name is required")
        return int_pb.LoraAdapters(adapters=await self._service.unload_lora_adapter(request.lora_name))
