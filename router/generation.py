"""The router's one request path, shared by every front door.

``llmserve.v1.Generate`` (``servicer.py``), the OpenAI HTTP door and the KServe v2 door
(``frontends/``) each translate their request into a :class:`RouterRequest` and run it here:
resolve the model to its live workers, tokenize (chat template included), rank the workers,
dispatch with retries, all inside the request's span, metrics and log line. A door opens the
observation first, so that its own decoding errors are counted like any other::

    with core.observe(model, request_id, operation="chat") as scope:
        request = translate(body)                     # the door's errors: InvalidRequest
        async for chunk in scope.generate(request):   # llmserve.v1.GenerateResponse chunks
            ...

The internal request is the ``GenerateRequest`` the worker receives (sampling as
``llmserve.v1.SamplingParams``) and the chunks are the worker's own messages, forwarded as they
are, so the native door adds no re-encoding; the other doors convert only shapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from contextlib import aclosing, contextmanager
from dataclasses import dataclass

from llmserve.fleet import WorkerRecord
from llmserve.multimodal import ImageSpan
from llmserve.prompt_input import PromptInput
from llmserve.v1 import generation_pb2 as gen_pb
from router.access import AccessConfig, AccessControl
from router.dispatch import Dispatcher
from router.errors import InvalidRequest, ModelUnavailable, RequestTooLarge, WorkersBusy, cancelled_by_caller
from router.images import spans_of
from router.policy import Ranked
from router.request_telemetry import RequestObservation, RouterTelemetry
from router.routing import ModelSummary, Router
from router.tokenizers import RouterTokenizer

TimeRemaining = Callable[[], "float | None"]


def _no_deadline() -> float | None:
    return None


@dataclass(frozen=True)
class RouterRequest:
    """One generation as every door hands it to the core.

    ``model`` may be "" when the fleet serves one model. ``max_tokens_to_context``: an unset
    ``sampling.max_tokens`` means "until the context is full" (OpenAI chat) rather than the
    API's default of 16; the core sets it from the model's ``max_model_len`` and the prompt.
    ``priority``: lower runs first on workers with ``--scheduling-policy priority``; None takes the
    model's default (router flag ``--default-priority``), else the worker's (0).
    ``request_id``: what the client sees in every chunk, log line and span. A client's own id
    need not be unique (another caller may use the same one), so workers, which key running
    requests on it, get :func:`worker_request_id` instead, unless ``request_id_unique``.
    """

    model: str
    prompt: PromptInput
    sampling: gen_pb.SamplingParams
    request_id: str
    max_tokens_to_context: bool = False
    priority: int | None = None
    request_id_unique: bool = False  # the door made the id itself (unique): workers get it as it is
    embed: bool = False  # the prompt's embedding (GenerateRequest.task TASK_EMBED), not text
    images: tuple[bytes, ...] = ()  # the prompt's images, encoded files, one per image token in order


class RequestScope:
    """One observed request: :meth:`generate` runs it; the resolved model, its tokenizer and the
    prompt's token ids are there for doors that render tokens (logprobs, echo)."""

    def __init__(self, core: GenerationCore, obs: RequestObservation) -> None:
        self._core = core
        self._obs = obs
        self.prompt_token_ids: list[int] = []  # as workers get them: set once tokenized
        self._image_spans: tuple[ImageSpan, ...] = ()  # their images' spans (prefix hashes)

    @property
    def model(self) -> str:
        """The resolved model name ("" until :meth:`generate` has resolved it)."""
        return self._obs.model

    async def generate(
        self, request: RouterRequest, time_remaining: TimeRemaining = _no_deadline
    ) -> AsyncIterator[gen_pb.GenerateResponse]:
        """The worker's chunks for ``request`` (their ``request_id`` the client's); a
        ``RouterError`` when it cannot be served.

        ``time_remaining`` gives the client's remaining deadline in seconds (None: none).
        Closing the iteration cancels the worker's call, which aborts the request there."""
        try:
            async with aclosing(self._generate(request, time_remaining)) as chunks:
                async for chunk in chunks:
                    chunk.request_id = request.request_id
                    yield chunk
        except asyncio.CancelledError:
            if cancelled_by_caller():
                raise
            # Nobody cancelled this request: a call under it was cut (grpc.aio raises
            # CancelledError when a channel closes under its calls). A failure, never a cancel.
            raise ModelUnavailable(self._obs.model or request.model,
                                   "a call to its worker was cut by the router") from None

    async def _generate(
        self, request: RouterRequest, time_remaining: TimeRemaining
    ) -> AsyncGenerator[gen_pb.GenerateResponse, None]:
        router = self._core.router
        obs = self._obs
        model, workers = await router.resolve(request.model)
        obs.set_model(model)
        # before the prompt costs anything
        router.admit(request.request_id, request.prompt, request.sampling, len(request.images))
        if request.images and request.embed:
            raise InvalidRequest("images: embeddings of prompts with images are not served")
        self._core.access.admit(model)  # the caller's key may use the model; its request budget
        truncate = (request.sampling.truncate_prompt_tokens
                    if request.sampling.HasField("truncate_prompt_tokens") else None)
        token_ids = await router.token_ids(model, workers, request.prompt, truncate, request.images)
        self.prompt_token_ids = token_ids
        if request.images:
            tok = router.tokenizers.cached(model)
            self._image_spans = spans_of(tok.image_tokens if tok is not None else None, token_ids,
                                         request.images)
        ranked = await router.rank(model, workers, token_ids, request.request_id, self._image_spans)
        obs.on_ranked(ranked)
        sampling = request.sampling
        if request.max_tokens_to_context and not sampling.HasField("max_tokens"):
            sampling = gen_pb.SamplingParams()
            sampling.CopyFrom(request.sampling)
            context = min(w.max_model_len for w in workers)
            sampling.max_tokens = max(1, context - len(token_ids))
        forward = self._forward(request, model, token_ids, sampling)
        charge = self._core.access.charge_tokens(
            model, len(token_ids), sampling.max_tokens if sampling.HasField("max_tokens") else None,
            sampling.n if sampling.HasField("n") else 1)
        chunks = self._dispatch(forward, ranked, token_ids, time_remaining)
        generated = 0
        try:
            async for chunk in chunks:
                generated += len(chunk.token_ids)
                obs.on_chunk(bool(chunk.token_ids), chunk.finish_reason)
                if chunk.HasField("usage"):
                    u = chunk.usage
                    obs.on_usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                                 cached_tokens=u.cached_prompt_tokens, worker_id=chunk.worker_id,
                                 device_s=u.device_seconds)
                yield chunk
        finally:
            charge.settle(len(token_ids) + generated)  # the unused part of the estimate goes back

    def _forward(self, request: RouterRequest, model: str, token_ids: list[int],
                 sampling: gen_pb.SamplingParams) -> gen_pb.GenerateRequest:
        """The message workers get; INVALID_ARGUMENT when it cannot be sent (ids past int32, a
        message over ``--max-message-bytes``)."""
        try:
            prompt_ids = gen_pb.TokenIds(ids=token_ids)
        except ValueError:  # ids past int32 (the tokenizer never makes such ids)
            raise InvalidRequest("prompt_token_ids must be token ids below 2^31") from None
        forward = gen_pb.GenerateRequest(
            model=model,
            prompt_token_ids=prompt_ids,
            sampling=sampling,
            request_id=(request.request_id if request.request_id_unique
                        else worker_request_id(request.request_id)),
            task=gen_pb.TASK_EMBED if request.embed else gen_pb.TASK_GENERATE,
            images=request.images,
        )
        priority = self._core.default_priority.get(model) if request.priority is None else request.priority
        if priority is not None:
            forward.priority = priority
        self._core.check_message_size(forward)
        return forward

    async def _dispatch(
        self, forward: gen_pb.GenerateRequest, ranked: Ranked, token_ids: list[int],
        time_remaining: TimeRemaining,
    ) -> AsyncIterator[gen_pb.GenerateResponse]:
        """The dispatcher's chunks. When every candidate failed before the first chunk, once more
        on the live workers a fresh read of the registry adds: the cached view is up to
        ``registry_cache_s`` behind a worker that died and the standby promoted in its place."""
        core, obs = self._core, self._obs
        started = False

        async def more_workers(tried: frozenset[str]) -> list[WorkerRecord]:
            """Live workers not tried yet, ranked: a stream whose candidates all failed after its
            first token resumes on a worker the cached view missed."""
            live = await core.router.fresh_workers(forward.model, ())
            fresh = [w for w in live if w.worker_id not in tried]
            if not fresh:
                return []
            try:
                return (await core.router.rank(forward.model, fresh, token_ids, forward.request_id,
                                               self._image_spans)).workers
            except WorkersBusy:  # every queue looks full: resuming there beats failing the stream
                return fresh

        try:
            async for chunk in core.dispatcher.generate(forward, ranked.workers, time_remaining, obs,
                                                        more_workers):
                started = True
                yield chunk
            return
        except ModelUnavailable:
            fresh = [] if started else await core.router.fresh_workers(forward.model, ranked.workers)
            if not fresh:
                raise
        ranked = await core.router.rank(forward.model, fresh, token_ids, forward.request_id,
                                        self._image_spans)
        obs.on_ranked(ranked)
        async for chunk in core.dispatcher.generate(forward, ranked.workers, time_remaining, obs,
                                                    more_workers):
            yield chunk

    async def tokenizer(self) -> RouterTokenizer:
        """The resolved model's tokenizer (fetched from a worker when not loaded yet)."""
        router = self._core.router
        model, workers = await router.resolve(self._obs.model)
        return await router.tokenizers.get(model, workers)


class GenerationCore:
    """Resolve, tokenize, rank and dispatch, observed: what every door runs."""

    def __init__(self, router: Router, dispatcher: Dispatcher, telemetry: RouterTelemetry,
                 access: AccessControl | None = None,
                 default_priority: Mapping[str, int] | None = None,
                 max_message_bytes: int | None = None) -> None:
        """``access``: API-key model allow-lists and rate limits (default: everyone, unlimited);
        ``default_priority``: per model, the priority of requests that set none;
        ``max_message_bytes``: the largest message the channels to workers send (None: no check)."""
        self.default_priority: Mapping[str, int] = dict(default_priority or {})
        self.max_message_bytes = max_message_bytes
        self.router = router
        self.dispatcher = dispatcher
        self.telemetry = telemetry
        self.access = access if access is not None else AccessControl(AccessConfig())

    @contextmanager
    def observe(
        self, model: str, request_id: str, operation: str = "text_completion"
    ) -> Iterator[RequestScope]:
        """Span, metrics and log line around one request (see ``RouterTelemetry.observe``);
        everything the door does inside, its own decoding included, is counted."""
        with self.telemetry.observe(model, request_id, operation=operation) as obs:
            yield RequestScope(self, obs)

    def refused(self, model: str, request_id: str, exc: BaseException,
                operation: str = "text_completion") -> None:
        """Count ``exc``, raised by a door before its request reached :meth:`observe` (its own
        validation), as that request's outcome: the span, metrics and log line a refusal inside
        :meth:`observe` gets. The caller raises it on."""
        with contextlib.suppress(type(exc)), self.observe(model, request_id, operation=operation):
            raise exc

    async def list_models(self) -> list[ModelSummary]:
        """The live models the caller may use, sorted by name."""
        models = await self.router.list_models()
        visible = set(self.access.visible_models(m.name for m in models))
        return [m for m in models if m.name in visible]

    async def model_ready(self, model: str) -> bool:
        """True when ``model`` has at least one live worker and the caller may use it (as
        :meth:`list_models` shows it)."""
        return any(m.name == model for m in await self.list_models())

    def check_message_size(self, forward: gen_pb.GenerateRequest) -> None:
        """:class:`RequestTooLarge` when the message to the worker is over the channels' message
        limit: gRPC would refuse to send it (RESOURCE_EXHAUSTED, which is no worker's fault)."""
        limit = self.max_message_bytes
        if limit is not None:
            size = forward.ByteSize()
            if size > limit:
                raise RequestTooLarge("request", size, "max_message_bytes", limit, "--max-message-bytes")


_ID_SUFFIX_CHARS = 17  # "~" and 16 hex digits
_SHORT_ID_CHARS = 64  # ids up to 47 characters are kept whole, with their suffix


def worker_request_id(client_id: str) -> str:
    """The id a worker gets for a request whose client chose ``client_id``: that id (cut when
    needed) plus a random suffix, ``"order-1~5f0c...`` (greppable in the worker's logs, unique
    per router request). Never longer than ``client_id`` or 64 characters, whichever is longer,
    so a worker with the router's ``--max-request-id-len`` takes it."""
    keep = max(len(client_id), _SHORT_ID_CHARS) - _ID_SUFFIX_CHARS
    return f"{client_id[:keep]}~{secrets.token_hex(8)}"
