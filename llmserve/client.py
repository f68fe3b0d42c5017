"""A small typed client of the public ``llmserve.v1.Generation`` API (router or worker).

``Client`` is synchronous, ``AsyncClient`` is for asyncio; both offer ``generate`` (stream
of :class:`GenerationChunk` deltas), ``complete`` (stream collected into a
:class:`Completion`) and ``list_models``. Sampling parameters are keyword arguments with
vLLM's names (``max_tokens=32, temperature=0``). Failures raise :class:`LLMServeError`
carrying the gRPC status code. Stopping the iteration (or cancelling the task) cancels
the RPC, and the server aborts the request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from llmserve.sampling_extras import plugin_call_messages, structured_output_message
from llmserve.stop_reason import stop_reason
from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc

_SAMPLING_FIELDS = frozenset(f.name for f in pb.SamplingParams.DESCRIPTOR.fields)


class LLMServeError(Exception):
    """An RPC failed; ``code`` is the gRPC status code, ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> LLMServeError:
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = err.details() if hasattr(err, "details") else str(err)
        return cls(code, details or "")


@dataclass(frozen=True)
class Usage:
    """Token counts of a finished request (completion tokens summed over ``n``) and the device
    seconds it used on the worker that finished it."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    device_seconds: float = 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """Logprob of one generated (or prompt) token and the asked-for top alternatives (id, logprob,
    text)."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float, str], ...] = ()


@dataclass(frozen=True)
class GenerationChunk:
    """One streamed delta of sequence ``index``; the last chunk of the stream has ``usage``.

    ``prompt_logprobs``: a piece of the prompt's logprobs (``prompt_logprobs=N`` asked for them),
    in chunks with no token before the first token; the pieces in order cover the prompt's
    positions from the second on."""

    request_id: str
    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    usage: Usage | None = None
    worker_id: str | None = None
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    embedding: tuple[float, ...] = ()  # an embedding request's (``embed=True``), on its one chunk


@dataclass
class CompletionSequence:
    """One of the ``n`` sequences of a completion, fully collected."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class Completion:
    """A whole response: the sequences in index order, usage and the serving worker.

    ``prompt_logprobs`` (asked with ``prompt_logprobs=N``): one per prompt token from the second on
    (the first has none: vLLM's list less its leading None), the prompt token's logprob and rank
    and the position's top N; empty when not asked for."""

    request_id: str
    sequences: list[CompletionSequence]
    usage: Usage | None
    worker_id: str | None
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    embedding: tuple[float, ...] = ()  # an embedding request's vector (``embed=True``)

    @property
    def text(self) -> str:
        """Text of the first sequence."""
        return self.sequences[0].text if self.sequences else ""

    @property
    def token_ids(self) -> list[int]:
        """Token ids of the first sequence."""
        return self.sequences[0].token_ids if self.sequences else []


@dataclass(frozen=True)
class ModelInfo:
    """A model the server can serve."""

    name: str
    max_model_len: int
    num_workers: int
    num_standby_workers: int = 0  # warm standbys (not routed to until one promotes itself)
    quantization: str = ""  # weights' format: "none", "fp8", "gptq", "gguf" (docs/QUANTIZATION.md)
    kv_cache_dtype: str = ""  # "auto" or "fp8"
    weight_bytes: int = 0  # the weights as the worker stores them
    kv_cache_tokens: int = 0  # the KV pool's capacity
    parent: str = ""  # a LoRA adapter's base model ("" for a base model)


def build_request(
    model: str,
    prompt: str | None = None,
    *,
    prompt_token_ids: Sequence[int] | None = None,
    messages: Sequence[Mapping[str, str]] | None = None,
    add_generation_prompt: bool | None = None,
    continue_final_message: bool = False,
    request_id: str = "",
    priority: int | None = None,
    embed: bool = False,
    images: Sequence[bytes] = (),
    **sampling: Any,
) -> pb.GenerateRequest:
    """A GenerateRequest from Python values; exactly one of the three inputs must be given.
    ``embed``: ask for the prompt's embedding (``TASK_EMBED``, a model served with
    ``--runner pooling``; ``Completion.embedding``) rather than text. ``images``: encoded image
    files (PNG, JPEG ...) for a model that takes images, one per image token (``"<image>"``) of the
    prompt, in order (docs/MULTIMODAL.md).

    ``sampling`` holds ``SamplingParams`` fields by name; ``structured_output`` is a dict such
    as ``{"json": schema}``, ``logits_processors`` / ``stopping_criteria`` lists of names or
    ``{"name", "args"}`` dicts, ``beam_search`` a dict ``{"beam_width", "length_penalty"}`` (the
    ``n`` best beams come back, best first). ``priority``: lower runs first
    (``--scheduling-policy priority``)."""
    given = [x for x in (prompt, prompt_token_ids, messages) if x is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of prompt, prompt_token_ids, messages")
    unknown = sorted(set(sampling) - _SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling parameters {unknown}; known: {sorted(_SAMPLING_FIELDS)}")
    request = pb.GenerateRequest(model=model, request_id=request_id,
                                 task=pb.TASK_EMBED if embed else pb.TASK_GENERATE, images=list(images))
    if priority is not None:
        request.priority = priority
    if prompt is not None:
        request.prompt = prompt
    elif prompt_token_ids is not None:
        request.prompt_token_ids.ids.extend(prompt_token_ids)
    else:
        assert messages is not None
        request.messages.SetInParent()
        for m in messages:
            request.messages.messages.add(role=m["role"], content=m["content"])
        if add_generation_prompt is not None:
            request.messages.add_generation_prompt = add_generation_prompt
        if continue_final_message:  # the last message is the start of the answer
            request.messages.continue_final_message = True
    for name, value in sampling.items():
        if value is None:
            continue
        target = getattr(request.sampling, name)
        if name == "logit_bias":
            target.update({int(k): float(v) for k, v in value.items()})
        elif name == "structured_output":
            target.CopyFrom(structured_output_message(value))
        elif name in ("logits_processors", "stopping_criteria"):
            target.extend(plugin_call_messages(name, list(value)))
        elif name == "beam_search":  # {"beam_width": 4, "length_penalty": 1.0}
            target.CopyFrom(pb.BeamSearch(**value))
        elif name in ("stop", "stop_token_ids", "allowed_token_ids", "bad_words"):
            target.extend([value] if isinstance(value, str) else value)
        else:
            setattr(request.sampling, name, value)
    return request


def _token_logprobs(entries: Sequence[pb.TokenLogprobs]) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(lp.token_id, lp.logprob, lp.rank,
                     tuple((t.token_id, t.logprob, t.token) for t in lp.top))
        for lp in entries
    )


def chunk_from_proto(msg: pb.GenerateResponse) -> GenerationChunk:
    """Protobuf chunk -> :class:`GenerationChunk`."""
    return GenerationChunk(
        request_id=msg.request_id,
        index=msg.index,
        text=msg.text,
        token_ids=tuple(msg.token_ids),
        logprobs=_token_logprobs(msg.logprobs),
        finish_reason=msg.finish_reason or None,
        stop_reason=stop_reason(msg),
        usage=Usage(msg.usage.prompt_tokens, msg.usage.completion_tokens, msg.usage.cached_prompt_tokens,
                    msg.usage.device_seconds)
        if msg.HasField("usage")
        else None,
        worker_id=msg.worker_id or None,
        prompt_logprobs=_token_logprobs(msg.prompt_logprobs),
        embedding=tuple(msg.embedding),
    )


class CompletionCollector:
    """Accumulates chunks into a :class:`Completion`."""

    def __init__(self) -> None:
        self._sequences: dict[int, CompletionSequence] = {}
        self._request_id = ""
        self._usage: Usage | None = None
        self._worker_id: str | None = None
        self._prompt_logprobs: list[TokenLogprob] = []
        self._embedding: tuple[float, ...] = ()

    def add(self, chunk: GenerationChunk) -> None:
        self._request_id = chunk.request_id
        if chunk.embedding:  # an embedding request's one message: the vector and the usage
            self._embedding, self._usage, self._worker_id = chunk.embedding, chunk.usage, chunk.worker_id
            return
        if chunk.prompt_logprobs:  # such a chunk carries nothing else
            self._prompt_logprobs.extend(chunk.prompt_logprobs)
            return
        seq = self._sequences.setdefault(chunk.index, CompletionSequence(chunk.index))
        seq.text += chunk.text
        seq.token_ids.extend(chunk.token_ids)
        seq.logprobs.extend(chunk.logprobs)
        seq.finish_reason = chunk.finish_reason or seq.finish_reason
        seq.stop_reason = seq.stop_reason if chunk.stop_reason is None else chunk.stop_reason
        self._usage = chunk.usage or self._usage
        self._worker_id = chunk.worker_id or self._worker_id

    def result(self) -> Completion:
        sequences = [self._sequences[i] for i in sorted(self._sequences)]
        return Completion(self._request_id, sequences, self._usage, self._worker_id,
                          tuple(self._prompt_logprobs), self._embedding)


def _models(response: pb.ListModelsResponse) -> list[ModelInfo]:
    return [
        ModelInfo(m.name, m.max_model_len, m.num_workers, m.num_standby_workers, m.quantization,
                  m.kv_cache_dtype, m.weight_bytes, m.kv_cache_tokens, m.parent)
        for m in response.models
    ]


def _channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def _credentials(tls: bool, tls_ca: str | Path | None) -> grpc.ChannelCredentials | None:
    """TLS credentials (the system's CAs, or ``tls_ca``'s PEM bundle), or None for plaintext."""
    if not tls and tls_ca is None:
        return None
    return grpc.ssl_channel_credentials(Path(tls_ca).read_bytes() if tls_ca is not None else None)


def _auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


class Client:
    """Synchronous client. ``timeout_s`` is the default deadline of each call (None = none);
    ``api_key`` is sent as ``authorization: Bearer``; ``tls`` (system CAs) or ``tls_ca`` (a PEM
    bundle) dial over TLS (docs/SECURITY.md)."""

    def __init__(
        self, target: str, *, timeout_s: float | None = None, max_message_bytes: int = 16 * 1024 * 1024,
        api_key: str | None = None, tls: bool = False, tls_ca: str | Path | None = None,
    ) -> None:
        options = _channel_options(max_message_bytes)
        creds = _credentials(tls, tls_ca)
        self._channel = (grpc.insecure_channel(target, options=options) if creds is None
                         else grpc.secure_channel(target, creds, options=options))
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._timeout_s = timeout_s
        self._metadata = _auth_metadata(api_key)

    def generate(
        self, model: str, prompt: str | None = None, *, timeout_s: float | None = None, **kwargs: Any
    ) -> Iterator[GenerationChunk]:
        """Stream the deltas of one request (see :func:`build_request` for the arguments)."""
        request = build_request(model, prompt, **kwargs)
        call = self._stub.Generate(request, timeout=timeout_s or self._timeout_s, metadata=self._metadata)
        try:
            for msg in call:
                yield chunk_from_proto(msg)
        except grpc.RpcError as err:
            raise LLMServeError.from_rpc_error(err) from None
        finally:
            call.cancel()  # no-op once finished; aborts the request if the caller stopped early

    def complete(self, model: str, prompt: str | None = None, **kwargs: Any) -> Completion:
        """Run one request to the end and return it collected."""
        collector = CompletionCollector()
        for chunk in self.generate(model, prompt, **kwargs):
            collector.add(chunk)
        return collector.result()

    def list_models(self, *, timeout_s: float | None = None) -> list[ModelInfo]:
        try:
            response = self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout_s or self._timeout_s,
                                             metadata=self._metadata)
        except grpc.RpcError as err:
            raise LLMServeError.from_rpc_error(err) from None
        return _models(response)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client; create it inside a running event loop (arguments as for :class:`Client`)."""

    def __init__(
        self, target: str, *, timeout_s: float | None = None, max_message_bytes: int = 16 * 1024 * 1024,
        api_key: str | None = None, tls: bool = False, tls_ca: str | Path | None = None,
    ) -> None:
        options = _channel_options(max_message_bytes)
        creds = _credentials(tls, tls_ca)
        self._channel = (grpc.aio.insecure_channel(target, options=options) if creds is None
                         else grpc.aio.secure_channel(target, creds, options=options))
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._timeout_s = timeout_s
        self._metadata = _auth_metadata(api_key)

    async def generate(
        self, model: str, prompt: str | None = None, *, timeout_s: float | None = None, **kwargs: Any
    ) -> AsyncIterator[GenerationChunk]:
        """Stream the deltas of one request (see :func:`build_request` for the arguments)."""
        request = build_request(model, prompt, **kwargs)
        call = self._stub.Generate(request, timeout=timeout_s or self._timeout_s, metadata=self._metadata)
        try:
            async for msg in call:
                yield chunk_from_proto(msg)
        except grpc.RpcError as err:
            raise LLMServeError.from_rpc_error(err) from None
        finally:
            call.cancel()

    async def complete(self, model: str, prompt: str | None = None, **kwargs: Any) -> Completion:
        """Run one request to the end and return it collected."""
        collector = CompletionCollector()
        async for chunk in self.generate(model, prompt, **kwargs):
            collector.add(chunk)
        return collector.result()

    async def list_models(self, *, timeout_s: float | None = None) -> list[ModelInfo]:
        try:
            response = await self._stub.ListModels(
                pb.ListModelsRequest(), timeout=timeout_s or self._timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise LLMServeError.from_rpc_error(err) from None
        return _models(response)

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
