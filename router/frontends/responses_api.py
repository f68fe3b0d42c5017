"""OpenAI's Responses API at the OpenAI door: create, retrieve, delete and cancel responses.

- ``POST /v1/responses``: a chat (``responses_schema``) run through the door's generation path,
  rendered as chat renders it and shaped as a response (``responses_output``): whole, or streamed
  as OpenAI's typed events (``event: <type>`` and ``data: <json>``; ``response.created`` and
  ``response.in_progress`` once the first chunk arrives, so a request refused before it gets its
  own HTTP status, then the output items' events, then ``response.completed`` or, when the
  token limit cut it, ``response.incomplete``; a failure after the start is
  ``response.failed`` carrying the error). With ``store`` (the default) the response and the
  conversation it ends are stored (``responses_store``) for ``previous_response_id`` and
  retrieval, from any router.
- ``background``: the response is stored ``queued`` and returned at once; this router runs it
  (``in_progress``, then its final state) while clients poll ``GET``. At most
  ``max_background`` run per router (429 beyond).
- ``GET /v1/responses/{id}``, ``DELETE /v1/responses/{id}`` (a running background response is
  cancelled too), ``POST /v1/responses/{id}/cancel`` (background responses only; the router
  running it cancels it within ``cancel_poll_s`` when another router got the call).

A response belongs to the API key that created it: another key is told it does not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from llmserve.fleet import StoreUnavailable
from llmserve.telemetry.tracing import Tracing
from llmserve.v1 import generation_pb2 as gen_pb
from router.errors import BackgroundFull, RequestTooLarge, ResponseNotFound, StoreDown
from router.frontends.openai_errors import InvalidParam, http_error
from router.frontends.openai_responses import ChatRenderer, json_bytes
from router.frontends.openai_schemas import ChatCompletionRequest, json_body, model_hint, validate
from router.frontends.responses_output import (
    TERMINAL_STATUSES,
    ResponseEcho,
    ResponseOutput,
    Status,
    new_response_id,
    response_object,
    usage_object,
)
from router.frontends.responses_schema import ResponsesRequest, items_as_messages, text_config
from router.frontends.responses_store import ResponseStore, StoredResponse
from router.frontends.sse import Reply
from router.frontends.tool_calls import ToolChoice
from router.generation import GenerationCore, RouterRequest
from router.tokenizers import RouterTokenizer

log = logging.getLogger(__name__)

RESPONSES_ROUTE = "/v1/responses"
_OPERATION = "chat"  # the GenAI operation of the router span: a response is a chat
_CANCEL_WAIT_S = 5.0  # how long a cancel call waits for the response to end


class ObservedChunk(Protocol):
    """What the door's generation path yields per chunk (``openai_http._Observed``)."""

    @property
    def chunk(self) -> gen_pb.GenerateResponse: ...
    @property
    def model(self) -> str: ...
    @property
    def tokenizer(self) -> RouterTokenizer | None: ...


Observe = Callable[[RouterRequest, str, bool], AsyncGenerator[ObservedChunk, None]]


@dataclass
class _Plan:
    """One validated create request, ready to run."""

    response_id: str
    request: ResponsesRequest
    chat: ChatCompletionRequest
    tool_choice: ToolChoice  # the chat's, with the model's tool-call parser
    routed: RouterRequest
    history: list[dict[str, Any]]
    inputs: list[dict[str, Any]]  # the request's input as chat messages
    owner: str
    echo: ResponseEcho
    created_at: int = field(default_factory=lambda: int(time.time()))
    response: dict[str, Any] | None = None  # the final response, once the run ended
    output: ResponseOutput = field(default_factory=ResponseOutput)

    def object(self, status: Status, **kwargs: Any) -> dict[str, Any]:
        return response_object(self.response_id, self.echo, status, self.output.items,
                               created_at=self.created_at, **kwargs)


class ResponsesEndpoints:
    """The Responses API over the door's generation path (``observe``: one router request's
    observed chunks) and a :class:`ResponseStore` (None: nothing is stored)."""

    def __init__(self, core: GenerationCore, tracing: Tracing, observe: Observe, store: ResponseStore | None,
                 tool_call_parsers: Mapping[str, str], reasoning_parsers: Mapping[str, str]) -> None:
        self._core = core
        self._tracing = tracing
        self._observe = observe
        self._store = store if store is not None and store.config.enabled else None
        self._tool_call_parsers = tool_call_parsers
        self._reasoning_parsers = reasoning_parsers
        self._background: dict[str, asyncio.Task[None]] = {}
        self._stopping = False

    # -- create ---------------------------------------------------------------------------------
    async def create(self, body: bytes | RequestTooLarge, headers: Mapping[str, str]
                     ) -> AsyncGenerator[Reply | bytes, None]:
        response_id = new_response_id()
        data = json_body(body) if isinstance(body, bytes) else None
        hint = model_hint(data)
        whole: Reply | None = None
        with self._tracing.http_server(method="POST", route=RESPONSES_ROUTE, headers=headers) as http_span:
            streaming = False
            plan: _Plan | None = None
            try:
                try:
                    plan = await self._plan(response_id, body, data)
                except Exception as exc:  # the door's own refusals count as requests too
                    self._core.refused(hint, response_id, exc, operation=_OPERATION)
                    raise
                if plan.request.background:
                    whole = Reply(200, json_bytes(await self._start_background(plan)))
                else:
                    async with aclosing(self._run(plan)) as runs:
                        async for events in runs:
                            if plan.request.stream:
                                if not streaming:
                                    http_span.set_status_code(200)
                                    streaming = True
                                for event in events:
                                    yield _sse(event)
                    assert plan.response is not None
                    stored = await self._store_final(plan)
                    final = plan.response
                    if plan.request.stream:
                        kind = "incomplete" if final["status"] == "incomplete" else "completed"
                        yield _sse(plan.output.event(f"response.{kind}", response=final))
                    else:
                        whole = Reply(200, json_bytes(final))
                    if plan.request.store and not stored:
                        log.info("response %s was not stored (over the size limit, or the store failed)",
                                 response_id)
            except Exception as exc:  # noqa: BLE001 - every error becomes the door's error JSON
                error = http_error(exc, "input")
                if streaming and plan is not None:  # the status is sent: the failure goes in the stream
                    failed = plan.object("failed", error=_error_object(error.body))
                    yield _sse(plan.output.event("response.failed", response=failed))
                    return
                http_span.set_status_code(error.status)
                yield Reply(error.status, json_bytes(error.body), error.headers)
                return
            if whole is not None:
                http_span.set_status_code(200)
                yield whole

    async def _plan(self, response_id: str, body: bytes | RequestTooLarge, data: Any) -> _Plan:
        if isinstance(body, RequestTooLarge):
            raise body
        if not isinstance(data, dict):
            raise InvalidParam("body", "the request body must be a JSON object")
        request = validate(ResponsesRequest, data)
        request.check()
        owner = self._core.access.caller().key_id
        history: list[dict[str, Any]] = []
        if request.previous_response_id is not None:
            if self._store is None:
                raise InvalidParam("previous_response_id", "this server stores no responses (flag "
                                   "--responses-ttl-s is 0)")
            previous = await self._get(request.previous_response_id, owner, "previous_response_id")
            history = list(previous.conversation)
        if request.background and self._store is None:
            raise InvalidParam("background", "background needs stored responses (flag --responses-ttl-s "
                               "is 0)")
        chat = request.chat_request(history, data)
        parser = self._tool_call_parsers.get(chat.model, self._tool_call_parsers.get(""))
        routed = chat.to_router_request(response_id, parser)
        tool_choice = chat.tool_choice_spec(parser)
        echo = ResponseEcho(
            model=request.model, instructions=request.instructions,
            max_output_tokens=request.max_output_tokens,
            temperature=request.temperature, top_p=request.top_p, top_logprobs=request.top_logprobs,
            tools=tuple(request.tools or ()),
            tool_choice=request.tool_choice if request.tool_choice is not None else (
                "auto" if request.tools else "none"),
            parallel_tool_calls=request.parallel_tool_calls, text=text_config(request.text),
            reasoning=request.reasoning, store=request.store and self._store is not None,
            background=request.background, previous_response_id=request.previous_response_id,
            metadata=dict(request.metadata or {}), user=request.user)
        return _Plan(response_id, request, chat, tool_choice, routed, history, request.input_messages(),
                     owner, echo)

    async def _run(self, plan: _Plan) -> AsyncGenerator[list[dict[str, Any]], None]:
        """The response's events, a list per chunk (the first list starts with
        ``response.created``); ``plan.response`` holds the final response after the last."""
        chat, output = plan.chat, plan.output
        tokens = chat.logprobs
        renderer: ChatRenderer | None = None
        usage: dict[str, Any] | None = None
        finish: str | None = None
        async with aclosing(self._observe(plan.routed, _OPERATION, tokens)) as chunks:
            async for observed in chunks:
                events: list[dict[str, Any]] = []
                if renderer is None:
                    renderer = self._renderer(plan, observed.model, observed.tokenizer)
                    plan.echo = replace(plan.echo, model=observed.model)  # the resolved name
                    started = plan.object("in_progress")
                    events += [output.event("response.created", response=started),
                               output.event("response.in_progress", response=started)]
                chunk = observed.chunk
                for obj in renderer.event_objects(chunk):
                    if obj["choices"]:
                        choice = obj["choices"][0]
                        logprobs = (choice.get("logprobs") or {}).get("content")
                        events += output.feed(choice["delta"], logprobs, len(chunk.token_ids))
                        finish = choice.get("finish_reason") or finish
                    elif obj.get("usage") is not None:
                        usage = obj["usage"]
                yield events
        status: Literal["completed", "incomplete"] = "incomplete" if finish == "length" else "completed"
        closing = output.finish(status)
        plan.response = plan.object(status, usage=usage_object(usage, output.reasoning_tokens),
                                    incomplete_reason="max_output_tokens" if status == "incomplete" else None)
        yield closing

    def _renderer(self, plan: _Plan, model: str, tokenizer: RouterTokenizer | None) -> ChatRenderer:
        chat = plan.chat
        reasoning = self._reasoning_parsers.get(chat.model, self._reasoning_parsers.get(""))
        return ChatRenderer(plan.response_id, model, logprobs=chat.logprobs, include_usage=True,
                            tokenizer=tokenizer, tool_choice=plan.tool_choice,
                            reasoning_parser=reasoning, include_reasoning=chat.include_reasoning)

    def _stored(self, plan: _Plan, response: dict[str, Any]) -> StoredResponse:
        conversation = [*plan.history, *plan.inputs, *items_as_messages(response["output"], "output")]
        return StoredResponse(response, tuple(conversation), plan.owner)

    async def _store_final(self, plan: _Plan) -> bool:
        """Store the finished response when asked; its ``store`` says false when it was not."""
        assert plan.response is not None
        if not plan.echo.store:
            return False
        if not await self._put(self._stored(plan, plan.response)):
            plan.response["store"] = False
            return False
        return True

    async def _put(self, stored: StoredResponse) -> bool:
        """Store ``stored``: False when it is over the size limit or the store is down (logged)."""
        assert self._store is not None
        blob = self._store.encode(stored)
        if blob is None:
            return False
        try:
            await self._store.put(stored.response_id, blob)
        except StoreUnavailable as exc:
            log.warning("response %s not stored: %s", stored.response_id, exc)
            return False
        return True

    # -- background -----------------------------------------------------------------------------
    async def _start_background(self, plan: _Plan) -> dict[str, Any]:
        assert self._store is not None
        limit = self._store.config.max_background
        if len(self._background) >= limit or self._stopping:
            raise BackgroundFull(limit)
        queued = plan.object("queued")
        stored = self._stored(plan, queued)
        blob = self._store.encode(stored)
        if blob is None:
            raise InvalidParam("input", "the conversation is too large to store (max_stored_response_bytes, "
                               "flag --max-stored-response-bytes); background needs it stored")
        try:
            await self._store.put(plan.response_id, blob)
        except StoreUnavailable as exc:
            raise StoreDown(str(exc)) from None
        task = asyncio.create_task(self._run_background(plan), name=f"background {plan.response_id}")
        self._background[plan.response_id] = task
        task.add_done_callback(lambda _: self._background.pop(plan.response_id, None))
        return queued

    async def _run_background(self, plan: _Plan) -> None:
        """Run a background response to its end and store each state; cancelled (a cancel call,
        a deletion, the router stopping), it is stored as such unless it was deleted."""
        assert self._store is not None
        watcher = asyncio.create_task(self._watch_cancel(plan.response_id, asyncio.current_task()))
        final: dict[str, Any]
        try:
            await self._put(self._stored(plan, plan.object("in_progress")))
            async with aclosing(self._run(plan)) as runs:
                async for _ in runs:
                    pass
            assert plan.response is not None
            final = plan.response
        except asyncio.CancelledError:
            if self._stopping:
                final = plan.object("failed", error={
                    "code": "server_error", "message": "the router running this background response stopped"})
            else:
                final = plan.object("cancelled")
        except Exception as exc:  # noqa: BLE001 - the failure is the response's state
            final = plan.object("failed", error=_error_object(http_error(exc, "input").body))
        finally:
            watcher.cancel()
        try:
            if await self._store.get(plan.response_id, plan.owner) is not None:  # not deleted meanwhile
                await self._put(self._stored(plan, final))
        except StoreUnavailable as exc:
            log.warning("background response %s: final state not stored: %s", plan.response_id, exc)

    async def _watch_cancel(self, response_id: str, task: asyncio.Task[Any] | None) -> None:
        """Cancel ``task`` once a cancel request for ``response_id`` is in the store."""
        assert self._store is not None and task is not None
        while True:
            await asyncio.sleep(self._store.config.cancel_poll_s)
            with contextlib.suppress(StoreUnavailable):
                if await self._store.cancel_requested(response_id):
                    task.cancel()
                    return

    def running(self) -> frozenset[str]:
        """The ids of the background responses this router runs now."""
        return frozenset(self._background)

    async def drain(self, grace_s: float) -> None:
        """Router stop: background responses get ``grace_s`` to end, then are stopped (stored as
        failed)."""
        self._stopping = True
        tasks = list(self._background.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    # -- retrieve, delete, cancel -----------------------------------------------------------------
    async def _get(self, response_id: str, owner: str, param: str | None) -> StoredResponse:
        if self._store is None:
            raise ResponseNotFound(response_id, param)
        try:
            stored = await self._store.get(response_id, owner)  # None for an id of no response's form
        except StoreUnavailable as exc:
            raise StoreDown(str(exc)) from None
        if stored is None:
            raise ResponseNotFound(response_id, param)
        return stored

    async def retrieve(self, response_id: str, stream: bool) -> dict[str, Any]:
        if stream:
            raise InvalidParam("stream", "streaming a stored response is not supported: GET it whole")
        return (await self._get(response_id, self._core.access.caller().key_id, None)).response

    async def delete(self, response_id: str) -> dict[str, Any]:
        stored = await self._get(response_id, self._core.access.caller().key_id, None)
        assert self._store is not None
        try:
            await self._store.delete(response_id)
            if stored.response["status"] not in TERMINAL_STATUSES:
                await self._cancel_running(response_id)
        except StoreUnavailable as exc:
            raise StoreDown(str(exc)) from None
        return {"id": response_id, "object": "response", "deleted": True}

    async def cancel(self, response_id: str) -> dict[str, Any]:
        owner = self._core.access.caller().key_id
        stored = await self._get(response_id, owner, None)
        if not stored.response.get("background"):
            raise InvalidParam("response_id", "only background responses can be cancelled")
        if stored.response["status"] in TERMINAL_STATUSES:
            return stored.response
        try:
            await self._cancel_running(response_id)
        except StoreUnavailable as exc:
            raise StoreDown(str(exc)) from None
        deadline = time.monotonic() + _CANCEL_WAIT_S
        while time.monotonic() < deadline:  # until the router running it stored its end
            stored = await self._get(response_id, owner, None)
            if stored.response["status"] in TERMINAL_STATUSES:
                break
            await asyncio.sleep(0.05)
        return stored.response

    async def _cancel_running(self, response_id: str) -> None:
        """Cancel a running background response: here when this router runs it, else through the store."""
        task = self._background.get(response_id)
        if task is None:
            assert self._store is not None
            await self._store.request_cancel(response_id)
            return
        task.cancel()
        await asyncio.wait({task}, timeout=_CANCEL_WAIT_S)  # returns when it ended; raises nothing of its own


def _error_object(body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's error JSON as a response's ``error`` (``code``, ``message``)."""
    error = body.get("error", {})
    code = error.get("code") or error.get("type") or "server_error"
    return {"code": code, "message": error.get("message", "")}


def _sse(event: dict[str, Any]) -> bytes:
    """One typed server-sent event (the Responses API names each event's type)."""
    return b"event: " + event["type"].encode() + b"\ndata: " + json_bytes(event) + b"\n\n"
