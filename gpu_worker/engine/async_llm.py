"""AsyncLLM: the asyncio front of the engine, over an :class:`EngineCoreClient`.

Threads and ownership:

* the **engine core** runs its busy loop where the client put it (a thread of this process,
  or a child process) and owns the scheduler, the KV pool and the model;
* the **event loop** owns the :class:`InputProcessor` (tokenization, validation), the
  :class:`OutputProcessor` (detokenization, stop strings) and one ``asyncio.Queue`` per
  request. It sends adds and aborts straight to the client;
* the **client's thread** (the core thread, or the reader of the child's pipe) calls
  :meth:`AsyncLLM._on_result` once per core loop turn: it updates the load snapshot and the KV
  events, and hands the turn's outputs to each request's event loop in one callback.

``_lock`` guards what both sides touch: routes (core request id -> event loop and user
request), pending queries, the stats snapshot, the adds not yet seen by the core, the KV events
and the dead flag. A core that fails or dies fails every in-flight request with
:class:`EngineDeadError` (never a hang) and the engine refuses new work from then on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from functools import partial
from typing import Any

from gpu_worker.beam_search import (
    BeamSearch,
    BeamSearchParams,
    BeamSearchSequence,
    candidates_of,
    resolve_max_tokens,
)
from gpu_worker.config import EngineConfig
from gpu_worker.core.types import EngineCoreOutput, SchedulerStats
from gpu_worker.engine.core_client import EngineCoreClient, make_core_client
from gpu_worker.engine.core_messages import (
    AbortRequests,
    AddRequest,
    LoadLora,
    QueryCachedHashes,
    ResetPrefixCache,
    StepResult,
    UnloadLora,
)
from gpu_worker.engine.errors import EngineClosedError, EngineDeadError, QueueFullError
from gpu_worker.engine.image_inputs import ImageInputs
from gpu_worker.engine.output_processor import OutputKind, OutputProcessor, merge_deltas
from gpu_worker.engine.processor import InputProcessor, ProcessedRequest
from gpu_worker.outputs import Logprob, RequestOutput
from gpu_worker.sampling_params import SamplingParams
from gpu_worker.structured.grammar import check_syntax
from llmserve.kv_events import KVEvent
from llmserve.limits import LimitExceeded, flag_of
from llmserve.prompt_input import PromptInput

logger = logging.getLogger(__name__)

# Process-wide GIL switch interval set when an AsyncLLM starts (Python's default is 5 ms).
_GIL_SWITCH_INTERVAL_S = 0.0005


@dataclass(frozen=True)
class _Route:
    """Where a core request's outputs go: the event loop and the user request id."""

    loop: asyncio.AbstractEventLoop
    request_id: str


class AsyncLLM:
    """Streams DELTA :class:`RequestOutput`s per request from one engine core.

    Use from one event loop at a time. ``generate`` is an async generator: when its consumer
    lags behind the engine, the deltas waiting in its queue are merged into one output, so a
    slow stream costs one message per read, not one per engine step. Validation errors
    (``ValueError``), :class:`QueueFullError` and :class:`EngineClosedError` are raised by its
    first ``__anext__``; leaving it early (break, cancellation, ``aclose``) aborts the request
    in the core, which frees its KV blocks before the next step.
    """

    def __init__(self, client: EngineCoreClient) -> None:
        self.client = client
        info = client.info
        self._tokenizer = info.tokenizer
        self._config = info.config  # the effective one (max_model_len filled in)
        self._processor = InputProcessor(
            info.tokenizer, info.vocab_size, info.max_model_len, info.eos_token_ids,
            pooling=info.config.runner == "pooling",
            lora_names=frozenset(name for name, _ in info.config.lora_adapters), images=info.images,
        )
        self._outputs = OutputProcessor(info.tokenizer)  # event-loop side only
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}  # event-loop side
        self._lock = threading.Lock()
        self._routes: dict[str, _Route] = {}
        self._queries: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]] = {}
        self._query_ids = itertools.count()
        # Core request ids are the user's id plus this tag: a client may reuse an id as soon as
        # its stream ended, while outputs of the old one (a stop string ends it here, the abort
        # reaches the core later) are still on their way.
        self._submissions = itertools.count()
        self._stats = info.stats  # replaced (never mutated) by the client's thread
        self._num_queued_adds = 0  # core requests sent but not yet taken by the core
        self._num_queued_add_tokens = 0  # their tokens
        self._queued_adds: deque[tuple[int, int]] = deque()  # (core requests, tokens) per add, in order
        self._kv_events: list[KVEvent] = []
        self._dead: BaseException | None = None  # set once the core failed
        self._dead_callbacks: list[tuple[asyncio.AbstractEventLoop, Callable[[BaseException], None]]] = []
        self._closed = False  # no new requests (shutdown started)
        # Formats (structured output) not seen before are parsed on this thread, one at a time;
        # the parses in flight by format key (event-loop side).
        self._format_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="format-check")
        self._format_parses: dict[tuple[str, str], asyncio.Future[None]] = {}
        # Every torch call releases the GIL and must win it back from the event loop, which by
        # default waits out a 5 ms switch interval each time: W4 measured decode steps twice as
        # long as offline with the core on a thread. A short interval keeps the core moving.
        sys.setswitchinterval(min(sys.getswitchinterval(), _GIL_SWITCH_INTERVAL_S))
        client.start(self._on_result, self._on_dead)

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncLLM:
        """Load the model and warm it up (blocking: call it from a worker thread if needed).

        With ``config.engine_core_process`` (default: on CUDA) the core runs in a child process,
        else on a thread of this one (:func:`~gpu_worker.engine.core_client.make_core_client`).
        """
        return cls(make_core_client(config))

    # ------------------------------------------------------------------ properties

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def images(self) -> ImageInputs | None:
        """The model's image preprocessing (None: a model that takes no images)."""
        return self._processor.images

    @property
    def config(self) -> EngineConfig:
        return self._config

    @property
    def model_name(self) -> str:
        return self._config.model_name

    @property
    def max_model_len(self) -> int:
        return self.client.info.max_model_len

    @property
    def block_size(self) -> int:
        return self._config.block_size

    @property
    def weight_bytes(self) -> int:
        """Bytes of the model's weights as the engine stores them (all ranks)."""
        return self.client.info.weight_bytes

    @property
    def kv_cache_tokens(self) -> int:
        """Tokens the KV pool holds."""
        return self.client.info.stats.num_total_blocks * self._config.block_size

    @property
    def num_in_flight(self) -> int:
        """Requests whose stream is still open."""
        return len(self._queues)

    # ------------------------------------------------------------------ requests

    async def generate(
        self,
        prompt: PromptInput,
        params: SamplingParams | None,
        request_id: str,
        resumed_token_ids: Sequence[int] = (),
        priority: int = 0,
        lora_name: str = "",
        images: Sequence[Any] = (),
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream the request's outputs as deltas; the last one has ``finished=True``.

        ``resumed_token_ids``: outputs another worker produced before it failed; the stream
        continues after them (see :meth:`InputProcessor.process`). ``priority``: lower runs first
        when the engine's scheduling policy is ``priority``. ``lora_name``: the LoRA adapter
        ("": the base model). ``images``: the prompt's images (encoded files or ``PIL.Image``s),
        decoded and preprocessed on a thread, off the event loop."""
        self._check_accepting()
        self._check_sequence_room(params.n if params is not None else 1)  # before tokenizing
        await self._check_format_syntax(params)
        process = partial(
            self._processor.process, request_id, prompt, params, priority=priority,
            resumed_token_ids=resumed_token_ids, core_tag=f"@{next(self._submissions)}", lora_name=lora_name,
            images=images,
        )
        processed = await asyncio.to_thread(process) if images else process()
        if request_id in self._queues:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        self._check_queue_room(processed)
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._outputs.add_request(processed, OutputKind.DELTA)
        self._queues[request_id] = queue
        loop = asyncio.get_running_loop()
        with self._lock:
            dead = self._dead
            if dead is None:
                for core_request in processed.core_requests:
                    self._routes[core_request.request_id] = _Route(loop, request_id)
                num_adds, num_tokens = _queue_cost(processed)
                self._num_queued_adds += num_adds
                self._num_queued_add_tokens += num_tokens
                self._queued_adds.append((num_adds, num_tokens))
        if dead is None:
            self.client.send(AddRequest(request_id, processed.core_requests))
        else:  # died between the admission check and here
            self._on_error([request_id], _dead_error(dead))
        finished = False
        error: BaseException | None = None  # found behind merged deltas: raised after them
        try:
            while not finished:
                item = error or await queue.get()
                if isinstance(item, BaseException):
                    raise item
                item, error = _coalesce(item, queue)
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._abort_on_loop(request_id)

    async def beam_search(self, prompt: PromptInput, params: BeamSearchParams, request_id: str,
                          lora_name: str = "", priority: int = 0
                          ) -> tuple[list[int], list[BeamSearchSequence]]:
        """(the prompt's token ids, its ``params.beam_width`` best beams, best first):
        ``gpu_worker/beam_search.py``, each step one request per live beam (``{request_id}~bS.I``)
        for one token and its ``2 * beam_width`` top log probabilities. Cancelling it aborts the
        step's requests. ``ValueError`` when the prompt and ``max_tokens`` pass the context."""
        self._check_accepting()
        _, ids = self._processor.tokenize(prompt)
        params = resolve_max_tokens(params, len(ids), self.max_model_len)
        search = BeamSearch(ids, params, self._processor.eos_token_ids)
        step = search.step_params()

        async def next_token(tokens: tuple[int, ...], sub_id: str) -> dict[int, Logprob]:
            async with aclosing(self.generate(list(tokens), step, sub_id, priority=priority,
                                              lora_name=lora_name)) as outputs:
                async for output in outputs:
                    found = candidates_of(output)
                    if found:
                        return found
            return {}

        while not search.done:
            tasks = [asyncio.ensure_future(next_token(beam.tokens, f"{request_id}~b{search.steps}.{i}"))
                     for i, beam in enumerate(search.live)]
            try:  # one beam's failure (or a cancel) cancels the others, which aborts them
                await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            failure = next((t.exception() for t in tasks if not t.cancelled() and t.exception()), None)
            if failure is not None:
                raise failure
            search.step([task.result() for task in tasks])
        return list(ids), search.best()

    async def _check_format_syntax(self, params: SamplingParams | None) -> None:
        """Parse a structured-output format not seen before on the format-check thread, so a
        large or deeply nested one (and xgrammar's first import) never holds the event loop;
        ``ValueError`` when it does not parse. Requests with the same format share one parse."""
        features = self._processor.features
        spec = features.unchecked_format(params)
        if spec is None:
            return
        key = spec.key
        parse = self._format_parses.get(key)
        if parse is None:
            parse = asyncio.wrap_future(self._format_pool.submit(check_syntax, spec))
            self._format_parses[key] = parse
            parse.add_done_callback(lambda done: self._parse_done(key, done))
        try:
            await asyncio.shield(parse)  # one caller's cancel leaves the parse to the others
        except asyncio.CancelledError:
            if not parse.cancelled():
                raise  # this request was cancelled
            raise EngineClosedError("the engine shut down") from None  # the pool was
        features.note_valid(spec)
        self._check_accepting()  # the engine may have shut down or died meanwhile

    def _parse_done(self, key: tuple[str, str], parse: asyncio.Future[None]) -> None:
        self._format_parses.pop(key, None)
        if not parse.cancelled():
            parse.exception()  # retrieved: every waiter may have left (no "never retrieved" log)

    async def abort(self, request_id: str) -> None:
        """Abort a request: its stream ends with a ``finish_reason="abort"`` output."""
        final = self._abort_on_loop(request_id)
        queue = self._queues.get(request_id)
        if queue is not None and final is not None:
            queue.put_nowait(final)

    def _abort_on_loop(self, request_id: str) -> RequestOutput | None:
        core_ids, final = self._outputs.abort_request(request_id)
        if core_ids:
            self._abort_in_core(core_ids)
        return final

    def _abort_in_core(self, core_ids: list[str]) -> None:
        with self._lock:
            for core_id in core_ids:
                self._routes.pop(core_id, None)
        self.client.send(AbortRequests(tuple(core_ids)))

    def _check_accepting(self) -> None:
        if self._dead is not None:
            raise _dead_error(self._dead)
        if self._closed:
            raise EngineClosedError("the engine is shut down")

    def _check_queue_room(self, processed: ProcessedRequest) -> None:
        """Room in the waiting queue for every sequence (``n``) and token of ``processed``,
        counting what the core has not taken from its inbox yet. Refused with
        :class:`QueueFullError` (retry later) or, when the request alone is over a limit,
        :class:`LimitExceeded` (it never fits)."""
        sequences, tokens = _queue_cost(processed)
        config = self._config
        for limit, need, bound in (
            ("max_queue_len", sequences, config.max_queue_len),
            ("max_queued_tokens", tokens, config.max_queued_tokens),
        ):
            if need > bound:
                unit = "sequences (n)" if limit == "max_queue_len" else "prompt tokens over its n sequences"
                raise LimitExceeded(limit, f"the request alone needs {need} {unit}; the queue holds at most "
                                           f"{bound} ({limit}, flag {flag_of(limit)})")
        self._check_sequence_room(sequences)
        with self._lock:
            waiting_tokens = self._stats.num_waiting_tokens + self._num_queued_add_tokens
        if waiting_tokens + tokens > config.max_queued_tokens:
            raise QueueFullError("max_queued_tokens", (
                f"queue full: {waiting_tokens} tokens are waiting and this request adds {tokens}; the "
                f"limit is {config.max_queued_tokens} tokens (max_queued_tokens, flag --max-queued-tokens)"))

    def on_dead(self, callback: Callable[[BaseException], None]) -> None:
        """Call ``callback(error)`` on this event loop once the engine core fails or dies (at once
        if it already has): the worker then stops serving and exits for its orchestrator."""
        loop = asyncio.get_running_loop()
        with self._lock:
            dead = self._dead
            if dead is None:
                self._dead_callbacks.append((loop, callback))
        if dead is not None:
            loop.call_soon(callback, dead)

    # ------------------------------------------------------------------ queries and observability

    def stats(self) -> SchedulerStats:
        """Load as of the core's last reported turn (a snapshot; safe from any thread).

        ``extra`` holds ``engine_steps`` and ``engine_step_time_s`` (cumulative seconds inside
        ``EngineCore.step``): their rate over wall time is how busy the core kept the device.
        """
        return self._stats

    def take_kv_events(self) -> list[KVEvent]:
        """KV block events since the last call (safe from any thread)."""
        with self._lock:
            events, self._kv_events = self._kv_events, []
        return events

    async def cached_block_hashes(self) -> set[bytes]:
        """Every cached block hash, answered by the core between two steps (the event loop
        keeps serving meanwhile)."""
        hashes: set[bytes] = await self._query(QueryCachedHashes)
        return hashes

    async def reset_prefix_cache(self) -> bool:
        """Forget every cached block (benchmarks' cold runs); False while requests hold blocks."""
        done: bool = await self._query(ResetPrefixCache)
        return done

    @property
    def lora_adapters(self) -> tuple[str, ...]:
        """The LoRA adapters new requests may name (configured and loaded at run time)."""
        return tuple(sorted(self._processor.lora_names))

    async def load_lora_adapter(self, name: str, path: str) -> None:
        """Serve the adapter at ``path`` as ``name`` (the core loads it between two steps on
        every rank); ``LoraUpdateError`` / ``ValueError`` naming why when refused."""
        error = await self._query(lambda query_id: LoadLora(query_id, name, path))
        if error is not None:
            raise error
        self._processor.lora_names = self._processor.lora_names | {name}

    async def unload_lora_adapter(self, name: str) -> None:
        """Refuse new requests for ``name`` from now on; its slot is freed once its running
        requests end. ``LoraUpdateError`` (kind ``not_found``) when it is not loaded."""
        self._processor.lora_names = self._processor.lora_names - {name}
        error = await self._query(lambda query_id: UnloadLora(query_id, name))
        if error is not None:
            raise error

    async def _query(self, make: Callable[[int], Any]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            if self._dead is not None:
                raise _dead_error(self._dead)
            query_id = next(self._query_ids)
            self._queries[query_id] = (loop, future)
        self.client.send(make(query_id))
        return await future

    async def shutdown(self) -> None:
        """Refuse new requests, fail the open streams with EngineClosedError, stop the core."""
        self._closed = True
        for request_id, queue in list(self._queues.items()):
            self._abort_on_loop(request_id)
            queue.put_nowait(EngineClosedError("the engine shut down"))
        self._format_pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.get_running_loop().run_in_executor(None, self.client.shutdown)

    # ------------------------------------------------------------------ the client's thread

    def _on_result(self, result: StepResult) -> None:
        """One core loop turn (client thread): state first, so a consumer that sees the
        outputs sees stats at least as new."""
        by_loop: dict[asyncio.AbstractEventLoop, list[EngineCoreOutput]] = {}
        failed: list[tuple[_Route, BaseException]] = []
        replies: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Any]] = []
        with self._lock:
            if result.stats is not None:  # None: the core held an unchanged snapshot back
                self._stats = result.stats
            self._num_queued_adds -= result.num_applied_adds
            self._take_applied_adds(result.num_applied_adds)
            self._kv_events.extend(result.kv_events)
            for add in result.failed_adds:
                failed.extend(
                    (self._routes.pop(cid), add.error)
                    for cid in [c for c, r in self._routes.items() if r.request_id == add.request_id]
                )
            for query_id, value in result.replies:
                entry = self._queries.pop(query_id, None)
                if entry is not None:
                    replies.append((*entry, value))
            for output in result.outputs:
                route = self._routes.get(output.request_id)
                if route is None:
                    continue  # aborted by the front meanwhile
                if output.finished:
                    del self._routes[output.request_id]
                by_loop.setdefault(route.loop, []).append(output)
        for route, error in {r.request_id: (r, e) for r, e in failed}.values():
            _post(route.loop, self._on_error, [route.request_id], error)
        for loop, future, value in replies:
            _post(loop, _resolve, future, value)
        for loop, outputs in by_loop.items():
            if not _post(loop, self._on_outputs, outputs):  # nobody listens: free their blocks
                self.client.send(AbortRequests(tuple(o.request_id for o in outputs)))

    def _check_sequence_room(self, sequences: int) -> None:
        with self._lock:
            waiting = self._stats.num_waiting + self._num_queued_adds
        limit = self._config.max_queue_len
        if waiting + sequences > limit and sequences <= limit:
            raise QueueFullError("max_queue_len", (
                f"queue full: {waiting} sequences are waiting and this request adds {sequences}; the "
                f"limit is {limit} sequences (max_queue_len, flag --max-queue-len)"))

    def _take_applied_adds(self, num_applied: int) -> None:
        """Stop counting the tokens of the adds the core took this turn (it applies them in the
        order they were sent, each one whole). Called with ``_lock`` held."""
        while num_applied > 0 and self._queued_adds:
            num_adds, num_tokens = self._queued_adds.popleft()
            num_applied -= num_adds
            self._num_queued_add_tokens -= num_tokens

    def _on_dead(self, exc: BaseException) -> None:
        """The core failed or died (client thread): fail every request and query in flight."""
        error = _dead_error(exc)
        with self._lock:
            self._dead = exc
            routes, self._routes = self._routes, {}
            queries, self._queries = self._queries, {}
            callbacks, self._dead_callbacks = self._dead_callbacks, []
        for loop, callback in callbacks:
            _post(loop, callback, exc)
        for loop, future in queries.values():
            _post(loop, _fail, future, error)
        by_loop: dict[asyncio.AbstractEventLoop, set[str]] = {}
        for route in routes.values():
            by_loop.setdefault(route.loop, set()).add(route.request_id)
        for loop, request_ids in by_loop.items():
            _post(loop, self._on_error, sorted(request_ids), error)

    # ------------------------------------------------------------------ event-loop side of results

    def _on_outputs(self, outputs: list[EngineCoreOutput]) -> None:
        processed = self._outputs.process_outputs(outputs)
        for output in processed.request_outputs:
            queue = self._queues.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)
        if processed.reqs_to_abort:  # ended by a stop string: free their KV blocks now
            self._abort_in_core(processed.reqs_to_abort)

    def _on_error(self, request_ids: list[str], error: BaseException) -> None:
        for request_id in request_ids:
            self._outputs.abort_request(request_id)
            queue = self._queues.get(request_id)
            if queue is not None:
                queue.put_nowait(error)


def _queue_cost(processed: ProcessedRequest) -> tuple[int, int]:
    """(sequences, tokens) a request adds to the waiting queue."""
    sequences = len(processed.core_requests)
    return sequences, sequences * (len(processed.prompt_token_ids) + len(processed.resumed_token_ids))


def _dead_error(exc: BaseException) -> EngineDeadError:
    error = EngineDeadError(f"the engine core failed: {exc!r}")
    error.__cause__ = exc
    return error


def _post(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> bool:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        return False
    return True


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _coalesce(
    first: RequestOutput, queue: asyncio.Queue[RequestOutput | BaseException]
) -> tuple[RequestOutput, BaseException | None]:
    """``first`` merged with the deltas already waiting behind it, and an error met there."""
    merged = first
    while not merged.finished and not queue.empty():
        item = queue.get_nowait()
        if isinstance(item, BaseException):
            return merged, item
        merged = merge_deltas(merged, item)
    return merged, None
