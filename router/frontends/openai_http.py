"""The OpenAI-compatible HTTP door of the router (FastAPI), served by ``http_server``.

``POST /v1/completions`` and ``POST /v1/chat/completions`` (streamed as server-sent events ending
with ``data: [DONE]``, or whole), ``POST /v1/embeddings``, the Responses API
(``/v1/responses``: ``responses_api``), ``GET /v1/models``, ``GET /v1/models/{model}``,
``GET /health``, and vLLM's ``POST /tokenize``, ``POST /detokenize`` (``openai_tokenize``) and
``GET /version``, and with ``--allow-lora-updates`` vLLM's ``POST /v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` (``lora_api``).
A request is validated (``openai_schemas``), translated into a
:class:`~router.generation.RouterRequest` and run by the shared
:class:`~router.generation.GenerationCore` inside the request's observation; the worker's chunks
are shaped by ``openai_responses``; errors become OpenAI's error JSON (``openai_errors``).
The HTTP SERVER span continues the caller's W3C ``traceparent``; the router's Generate span and
its calls to workers are its children, so one trace runs from the HTTP client to the worker.
A client that disconnects cancels its request on the worker (``sse.ReplyOrStream``).
A request body over ``max_body_bytes`` (flag ``--max-http-body-bytes``) is refused with 413 as
soon as its ``Content-Length``, or the bytes read so far, pass the limit: never read whole.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from llmserve.telemetry.tracing import Tracing
from llmserve.v1 import generation_pb2 as gen_pb
from router.errors import RequestTooLarge, model_name
from router.frontends.lora_api import LOAD_ROUTE, UNLOAD_ROUTE, LoraEndpoints
from router.frontends.merged import merged
from router.frontends.openai_errors import InvalidParam, error_body, http_error
from router.frontends.openai_responses import (
    DONE_EVENT,
    ChatRenderer,
    ChoiceRenderer,
    CompletionRenderer,
    json_bytes,
    sse_event,
)
from router.frontends.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    json_body,
    model_hint,
    validate,
)
from router.frontends.openai_tokenize import DETOKENIZE_ROUTE, TOKENIZE_ROUTE, TokenizerEndpoints
from router.frontends.pooling_api import EMBEDDINGS_ROUTE, RERANK_ROUTES, SCORE_ROUTES, PoolingEndpoints
from router.frontends.responses_api import RESPONSES_ROUTE, ResponsesEndpoints
from router.frontends.responses_store import ResponseStore
from router.frontends.sse import Reply, ReplyOrStream
from router.generation import GenerationCore, RouterRequest
from router.tokenizers import RouterTokenizer

COMPLETIONS_ROUTE = "/v1/completions"
CHAT_ROUTE = "/v1/chat/completions"
RESPONSE_ROUTE = RESPONSES_ROUTE + "/{response_id}"
CANCEL_ROUTE = RESPONSE_ROUTE + "/cancel"


@dataclass(frozen=True)
class _Endpoint:
    """What differs between completions and chat."""

    route: str
    operation: str  # GenAI operation name on the router span
    id_prefix: str
    schema: type[CompletionRequest] | type[ChatCompletionRequest]
    renderer: type[ChoiceRenderer]
    prompt_param: str  # the parameter holding the input


_COMPLETIONS = _Endpoint(COMPLETIONS_ROUTE, "text_completion", "cmpl", CompletionRequest, CompletionRenderer,
                         "prompt")
_CHAT = _Endpoint(CHAT_ROUTE, "chat", "chatcmpl", ChatCompletionRequest, ChatRenderer, "messages")


class _Observed(NamedTuple):
    """One chunk of a router request, with what its rendering needs."""

    request_index: int  # which of the door's router requests (a batch's prompt)
    chunk: gen_pb.GenerateResponse
    model: str  # resolved
    tokenizer: RouterTokenizer | None  # when the response renders tokens
    prompt_token_ids: list[int]  # as the workers got them (empty until tokenized)


JsonHandler = Callable[[dict[str, Any], str], Awaitable[dict[str, Any]]]
JsonCall = Callable[[], Awaitable[dict[str, Any]]]
TextCall = Callable[[], Awaitable[str]]


class OpenAIDoor:
    """Builds the FastAPI app of the OpenAI API over a :class:`GenerationCore`.

    ``serving`` tells whether the router takes requests (False while it drains: ``/health``
    answers 503); ``max_body_bytes``: the largest request body; ``version``: what ``/version``
    reports; ``max_batch_prompts``: the most prompts of one completions request;
    ``tool_call_parsers``: the tool-call parser of each model ("": of every model), for chat's
    ``tool_choice`` "auto"; ``reasoning_parsers``: the same for chat's ``reasoning_content``;
    ``responses``: where the Responses API stores responses (None: nowhere, ``store`` is false);
    ``lora``: vLLM's runtime LoRA endpoints (None: not served, ``--allow-lora-updates`` off).
    """

    def __init__(self, core: GenerationCore, tracing: Tracing, serving: Callable[[], bool],
                 max_body_bytes: int = 16 * 1024 * 1024, version: str = "unknown",
                 max_batch_prompts: int = 128, tool_call_parsers: Mapping[str, str] | None = None,
                 reasoning_parsers: Mapping[str, str] | None = None,
                 responses: ResponseStore | None = None, lora: LoraEndpoints | None = None) -> None:
        self._core = core
        self._lora = lora
        self._tracing = tracing
        self._serving = serving
        self._max_body_bytes = max_body_bytes
        self._version = version
        self._max_batch_prompts = max_batch_prompts
        self._tool_call_parsers = dict(tool_call_parsers or {})
        self._reasoning_parsers = dict(reasoning_parsers or {})
        self._tokenizer_endpoints = TokenizerEndpoints(core)
        self._pooling = PoolingEndpoints(core, lambda i, r, op: self._observed(i, r, op, False),
                                         max_batch_prompts)
        self.responses = ResponsesEndpoints(core, tracing, lambda r, op, t: self._observed(0, r, op, t),
                                            responses, self._tool_call_parsers, self._reasoning_parsers)

    def app(self) -> FastAPI:
        app = FastAPI(title="llmserve OpenAI-compatible API", docs_url=None, redoc_url=None,
                      openapi_url=None)

        async def completions(request: Request) -> Response:
            return await self._post(_COMPLETIONS, request)

        async def chat(request: Request) -> Response:
            return await self._post(_CHAT, request)

        def pooling(route: str) -> Callable[[Request], Awaitable[Response]]:
            async def handle(request: Request) -> Response:
                return await self._with_body(request, lambda body: self._call(
                    "POST", route, lambda: self._pooling.reply(route, _request_object(body)), request.headers,
                    self._pooling.input_param(route)))
            return handle

        async def create_response(request: Request) -> Response:
            return await self._with_body(
                request, lambda body: ReplyOrStream(self.responses.create(body, request.headers)))

        async def get_response(request: Request, response_id: str) -> Response:
            stream = request.query_params.get("stream", "false").lower() == "true"
            return self._call("GET", RESPONSE_ROUTE, lambda: self.responses.retrieve(response_id, stream),
                              request.headers)

        async def delete_response(request: Request, response_id: str) -> Response:
            return self._call("DELETE", RESPONSE_ROUTE, lambda: self.responses.delete(response_id),
                              request.headers)

        async def cancel_response(request: Request, response_id: str) -> Response:
            return self._call("POST", CANCEL_ROUTE, lambda: self.responses.cancel(response_id),
                              request.headers)

        async def tokenize(request: Request) -> Response:
            return await self._post_json(TOKENIZE_ROUTE, self._tokenizer_endpoints.tokenize, request)

        async def detokenize(request: Request) -> Response:
            return await self._post_json(DETOKENIZE_ROUTE, self._tokenizer_endpoints.detokenize, request)

        app.add_api_route(COMPLETIONS_ROUTE, completions, methods=["POST"])
        app.add_api_route(CHAT_ROUTE, chat, methods=["POST"])
        for route in (EMBEDDINGS_ROUTE, *SCORE_ROUTES, *RERANK_ROUTES):
            app.add_api_route(route, pooling(route), methods=["POST"])
        app.add_api_route(RESPONSES_ROUTE, create_response, methods=["POST"])
        app.add_api_route(RESPONSE_ROUTE, get_response, methods=["GET"])
        app.add_api_route(RESPONSE_ROUTE, delete_response, methods=["DELETE"])
        app.add_api_route(CANCEL_ROUTE, cancel_response, methods=["POST"])
        app.add_api_route(TOKENIZE_ROUTE, tokenize, methods=["POST"])
        app.add_api_route(DETOKENIZE_ROUTE, detokenize, methods=["POST"])
        if self._lora is not None:
            lora = self._lora
            for route, handle in ((LOAD_ROUTE, lora.load), (UNLOAD_ROUTE, lora.unload)):
                app.add_api_route(route, self._text_post(route, handle), methods=["POST"])
        app.add_api_route("/version", self._version_reply, methods=["GET"])
        app.add_api_route("/v1/models", self._models, methods=["GET"])
        app.add_api_route("/v1/models/{model:path}", self._model, methods=["GET"])
        app.add_api_route("/health", self._health, methods=["GET"])
        app.add_exception_handler(StarletteHTTPException, _http_exception)  # 404, 405 as OpenAI errors
        return app

    async def _with_body(self, request: Request, respond: Callable[[bytes | RequestTooLarge], Response]
                         ) -> Response:
        """``respond`` to the request's body (or the refusal of one over the limit)."""
        try:
            body = await self._body(request)
        except ClientDisconnect:  # the client left before its body ended, or the connection
            return Response(status_code=499)  # was refused (a body timeout): nobody reads this
        return respond(body)

    async def _post(self, endpoint: _Endpoint, request: Request) -> Response:
        return await self._with_body(request, lambda body: ReplyOrStream(self._serve(endpoint, body,
                                                                                     request.headers)))

    async def _post_json(self, route: str, handle: JsonHandler, request: Request) -> Response:
        """A JSON body in, one JSON reply out (``handle`` gets the body and a request id)."""
        return await self._with_body(request, lambda body: self._call(
            "POST", route, lambda: handle(_request_object(body), f"{route[1:]}-{uuid.uuid4().hex}"),
            request.headers, "prompt"))

    def _text_post(self, route: str, handle: Callable[[dict[str, Any]], Awaitable[str]]
                   ) -> Callable[[Request], Awaitable[Response]]:
        """A handler of a JSON body whose success is a plain-text reply (vLLM's admin endpoints)."""
        async def post(request: Request) -> Response:
            return await self._with_body(request, lambda body: self._call(
                "POST", route, lambda: handle(_request_object(body)), request.headers))
        return post

    def _call(self, method: str, route: str, call: JsonCall | TextCall, headers: Mapping[str, str],
              prompt_param: str = "input") -> Response:
        """One reply: ``call``'s (JSON, or plain text when it returns a string), or the door's
        error JSON (``prompt_param``: what the endpoint calls its input, named when a worker
        refuses it), inside the HTTP span."""
        async def reply() -> AsyncGenerator[Reply, None]:
            with self._tracing.http_server(method=method, route=route, headers=headers) as http_span:
                try:
                    value = await call()
                    result = (Reply(200, value.encode(), content_type="text/plain; charset=utf-8")
                              if isinstance(value, str) else Reply(200, json_bytes(value)))
                except Exception as exc:  # noqa: BLE001 - every error becomes the door's error JSON
                    error = http_error(exc, prompt_param)
                    result = Reply(error.status, json_bytes(error.body), error.headers)
                http_span.set_status_code(result.status)
            yield result

        return ReplyOrStream(reply())

    async def _body(self, request: Request) -> bytes | RequestTooLarge:
        """The request body, or the error of one over the limit (refused by its Content-Length,
        else as soon as the bytes received pass the limit; the rest is never read).
        ``ClientDisconnect`` when the connection ends first."""
        limit = self._max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return _body_too_large(int(declared), limit)
        parts: list[bytes] = []
        size = 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                return _body_too_large(None, limit)
            parts.append(part)
        return b"".join(parts)

    async def _serve(self, endpoint: _Endpoint, body: bytes | RequestTooLarge, headers: Mapping[str, str]
                     ) -> AsyncGenerator[Reply | bytes, None]:
        """One request, start to end, in one task: a JSON reply or SSE events. A completions
        batch (a list of prompts) runs one router request per prompt, each in a task of its own,
        rendered as one response: choice ``i * n + j`` is prompt ``i``'s sample ``j``, usage the
        sum (vLLM's shape)."""
        request_id = f"{endpoint.id_prefix}-{uuid.uuid4().hex}"
        data = json_body(body) if isinstance(body, bytes) else None
        hint = model_hint(data)
        whole: Reply | None = None  # a whole reply is sent after the observations close (as a success)
        with self._tracing.http_server(method="POST", route=endpoint.route, headers=headers) as http_span:
            streaming = False
            try:
                try:
                    parsed = _parsed(endpoint, body, data)
                    parser = self._tool_call_parsers.get(parsed.model, self._tool_call_parsers.get(""))
                    routed = parsed.to_router_requests(request_id, self._max_batch_prompts, parser)
                except Exception as exc:  # the door's own refusals count as requests too
                    self._core.refused(hint, request_id, exc, operation=endpoint.operation)
                    raise
                tokens = _needs_tokenizer(endpoint, parsed)
                batch = _Batch(parsed.n) if len(routed) > 1 else None
                operation = endpoint.operation
                chunks = (self._observed(0, routed[0], operation, tokens) if batch is None else merged(
                    [self._observed(i, r, operation, tokens) for i, r in enumerate(routed)]))
                renderer: ChoiceRenderer | None = None
                async with aclosing(chunks) as items:
                    async for i, chunk, model, tokenizer, prompt_ids in items:
                        if renderer is None:
                            renderer = self._renderer(endpoint, parsed, routed, model, tokenizer, request_id,
                                                      parser)
                            http_span.set_status_code(200)
                            streaming = parsed.stream
                        renderer.prompt_token_ids(i, prompt_ids)
                        if batch is not None:
                            chunk = batch.chunk(i, chunk)
                        if parsed.stream:
                            for event in renderer.event(chunk):
                                yield event
                        else:
                            renderer.add(chunk)
                assert renderer is not None  # the dispatcher never ends a stream empty
                if batch is not None:  # the summed usage, as the last chunk of one request
                    last = gen_pb.GenerateResponse(usage=batch.usage)
                    if parsed.stream:
                        for event in renderer.event(last):
                            yield event
                    else:
                        renderer.add(last)
                if parsed.stream:
                    yield DONE_EVENT
                else:
                    whole = Reply(200, json_bytes(renderer.full()))
            except Exception as exc:  # noqa: BLE001 - every error becomes the door's error JSON
                error = http_error(exc, endpoint.prompt_param)
                if streaming:  # the status is sent: the error goes in the stream
                    yield sse_event(error.body)
                    yield DONE_EVENT
                    return
                http_span.set_status_code(error.status)
                yield Reply(error.status, json_bytes(error.body), error.headers)
                return
            if whole is not None:
                yield whole

    async def _observed(self, index: int, request: RouterRequest, operation: str, tokens: bool
                        ) -> AsyncGenerator[_Observed, None]:
        """One router request's chunks inside its own observation (span, metrics, log line; its
        GenAI ``operation``), each
        with the request's index, the resolved model and (``tokens``) its tokenizer, which is
        fetched inside the observation, so a failure to fetch it is counted as the request's."""
        with self._core.observe(request.model, request.request_id, operation=operation) as scope:
            tokenizer = None
            async for chunk in scope.generate(request):
                if tokens and tokenizer is None:
                    tokenizer = await scope.tokenizer()
                yield _Observed(index, chunk, scope.model, tokenizer, scope.prompt_token_ids)

    def _renderer(self, endpoint: _Endpoint, parsed: Any, routed: list[RouterRequest], model: str,
                  tokenizer: RouterTokenizer | None, request_id: str, tool_parser: str | None
                  ) -> ChoiceRenderer:
        """The renderer of a request whose first chunk arrived (the model is resolved by then)."""
        options: dict[str, Any] = {
            "logprobs": _wants_logprobs(endpoint, parsed), "include_usage": parsed.include_usage,
            "tokenizer": tokenizer, "n": parsed.n, "prompt_logprobs": parsed.prompt_logprobs,
            "continuous_usage": parsed.continuous_usage,
        }
        if endpoint is _COMPLETIONS:
            echoes: str | tuple[str, ...] = ""
            if parsed.echo:
                assert tokenizer is not None
                echoes = tuple(r.prompt if isinstance(r.prompt, str)
                               else tokenizer.decode(cast(Sequence[int], r.prompt)) for r in routed)
            options.update(echo=echoes, echo_logprobs=parsed.echo_logprobs, echo_only=parsed.echo_only)
        else:
            reasoning = self._reasoning_parsers.get(parsed.model, self._reasoning_parsers.get(""))
            options.update(tool_choice=parsed.tool_choice_spec(tool_parser),
                           reasoning_parser=reasoning, include_reasoning=parsed.include_reasoning)
        return endpoint.renderer(request_id, model, **options)

    async def _models(self) -> Response:
        models = await self._core.list_models()
        data = [_model_card(m.name, m.max_model_len, m.parent) for m in models]
        return Response(json_bytes({"object": "list", "data": data}), media_type="application/json")

    async def _model(self, model: str) -> Response:
        for m in await self._core.list_models():
            if m.name == model:
                card = _model_card(m.name, m.max_model_len, m.parent)
                return Response(json_bytes(card), media_type="application/json")
        body = error_body(f"model {model_name(model)} is not served by any worker", "invalid_request_error",
                          "model", "model_not_found")
        return Response(json_bytes(body), status_code=404, media_type="application/json")

    async def _version_reply(self) -> Response:
        return Response(json_bytes({"version": self._version}), media_type="application/json")

    async def _health(self) -> Response:
        status = 200 if self._serving() else 503
        return Response(json_bytes({"status": "ok" if status == 200 else "draining"}), status_code=status,
                        media_type="application/json")


class _Batch:
    """A completions batch's chunks as one response's: choice indexes per prompt, usage summed."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.usage = gen_pb.Usage()

    def chunk(self, prompt: int, chunk: gen_pb.GenerateResponse) -> gen_pb.GenerateResponse:
        """``chunk`` of prompt ``prompt`` with its choice index in the response; its usage moves
        into the sum (sent once, at the end)."""
        out = gen_pb.GenerateResponse()
        out.CopyFrom(chunk)
        out.index = prompt * self.n + chunk.index
        if out.HasField("usage"):
            u, total = out.usage, self.usage
            total.prompt_tokens += u.prompt_tokens
            total.completion_tokens += u.completion_tokens
            total.cached_prompt_tokens += u.cached_prompt_tokens
            total.device_seconds += u.device_seconds
            out.ClearField("usage")
        return out


def _body_object(body: bytes | RequestTooLarge, data: Any) -> dict[str, Any]:
    """The request's JSON object (``data``, parsed from ``body``); the door's refusal otherwise."""
    if isinstance(body, RequestTooLarge):
        raise body
    if not isinstance(data, dict):
        raise InvalidParam("body", "the request body must be a JSON object")
    return data


def _request_object(body: bytes | RequestTooLarge) -> dict[str, Any]:
    """The request body's JSON object; the door's refusal otherwise."""
    return _body_object(body, json_body(body) if isinstance(body, bytes) else None)


def _parsed(endpoint: _Endpoint, body: bytes | RequestTooLarge, data: Any) -> Any:
    """The validated body of ``endpoint``; the door's refusal otherwise."""
    return validate(endpoint.schema, _body_object(body, data))


def _wants_logprobs(endpoint: _Endpoint, parsed: Any) -> bool:
    return parsed.logprobs is not None if endpoint is _COMPLETIONS else bool(parsed.logprobs)


def _needs_tokenizer(endpoint: _Endpoint, parsed: Any) -> bool:
    """Logprobs (the prompt's included) and echo render tokens with the model's tokenizer."""
    return (_wants_logprobs(endpoint, parsed) or parsed.prompt_logprobs is not None
            or (endpoint is _COMPLETIONS and bool(parsed.echo)))


def _model_card(name: str, max_model_len: int, parent: str) -> dict[str, Any]:
    """A model of GET /v1/models, in vLLM's shape: a LoRA adapter names its base model as
    ``parent`` (null for a base model); ``root`` is the model's own name."""
    return {"id": name, "object": "model", "created": 0, "owned_by": "llmserve",
            "root": name, "parent": parent or None, "max_model_len": max_model_len}


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's routing errors (an unknown path 404, a wrong method 405) in OpenAI's error
    JSON rather than ``{"detail": ...}``."""
    assert isinstance(exc, StarletteHTTPException)
    body = error_body(f"{request.method} {request.url.path}: {exc.detail}", "invalid_request_error",
                      None, None)
    return Response(json_bytes(body), status_code=exc.status_code, headers=exc.headers,
                    media_type="application/json")


def _body_too_large(size: int | None, limit: int) -> RequestTooLarge:
    return RequestTooLarge("the request body", size, "max_http_body_bytes", limit, "--max-http-body-bytes")
