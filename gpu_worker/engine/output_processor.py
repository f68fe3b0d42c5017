"""Turns engine-core outputs (token ids per core request) into user-facing RequestOutputs.

One :class:`_RequestState` per user request aggregates its ``n`` samples (core requests),
runs each sample's incremental detokenizer, builds logprob dicts and decides when a stop
string ends a sample; the front must then abort that core request (``reqs_to_abort``).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gpu_worker.core.types import EngineCoreOutput, FinishReason, TokenLogprobs
from gpu_worker.engine.detokenizer import IncrementalDetokenizer, TokenIdsOnly
from gpu_worker.engine.processor import ProcessedRequest
from gpu_worker.outputs import CompletionOutput, Logprob, RequestOutput
from gpu_worker.plugins.interfaces import StoppingCriterion
from gpu_worker.plugins.registry import PluginRegistry, stopping_criterion_registry
from gpu_worker.plugins.stopping import SampleCriteria
from gpu_worker.sampling_params import SamplingParams


class OutputKind(enum.Enum):
    """What each RequestOutput of a request carries."""

    CUMULATIVE = "cumulative"  # everything so far, after every step that changed it
    DELTA = "delta"  # only what is new, for the samples that changed (streaming)
    FINAL_ONLY = "final_only"  # one output, when the request has finished (offline)


@dataclass
class _Sample:
    """Mutable progress of one sample; owned by the OutputProcessor only."""

    index: int
    detokenizer: IncrementalDetokenizer | TokenIdsOnly
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_sent_tokens: int = 0  # delta mode: token ids / logprobs already handed out
    criteria: SampleCriteria | None = None  # stopping criteria (plug-ins) the request named

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    kind: OutputKind
    samples: list[_Sample]
    core_ids: list[str] = field(default_factory=list)  # core request id of each sample
    num_cached_tokens: int = 0
    device_s: float = 0.0  # device seconds of all samples so far
    # vLLM's shape (None first), once the core sent them; whether a delta output carried them.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    prompt_logprobs_sent: bool = False
    embedding: list[float] | None = None  # a pooling engine's result

    @property
    def finished(self) -> bool:
        # Twice per output of every step: a loop, not all() over a generator of properties.
        for sample in self.samples:
            if sample.finish_reason is None:
                return False
        return True


@dataclass(frozen=True)
class ProcessedOutputs:
    """Outputs for the user, and core requests that a stop string ended (abort them)."""

    request_outputs: list[RequestOutput]
    reqs_to_abort: list[str]


class OutputProcessor:
    """Keeps the per-request state of the front; not thread-safe (one owner thread/loop).

    With ``tokenizer=None`` outputs carry token ids with empty text (and logprobs without
    decoded tokens).
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._requests: dict[str, _RequestState] = {}
        self._samples: dict[str, tuple[_RequestState, _Sample]] = {}  # core request id -> sample
        self._token_text: dict[int, str] = {}  # decoded single tokens, for logprobs
        self._criteria: PluginRegistry[StoppingCriterion] | None = None

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    def has_request(self, request_id: str) -> bool:
        return request_id in self._requests

    def add_request(self, processed: ProcessedRequest, kind: OutputKind) -> None:
        """Start tracking a request; its id must not be in flight already."""
        if processed.request_id in self._requests:
            raise ValueError(f"request_id {processed.request_id!r} is already in flight")
        params = processed.params
        state = _RequestState(
            processed.request_id, processed.prompt, list(processed.prompt_token_ids), params, kind, []
        )
        for i, core_req in enumerate(processed.core_requests):
            detok: IncrementalDetokenizer | TokenIdsOnly = (
                TokenIdsOnly()
                if self._tokenizer is None
                else IncrementalDetokenizer(
                    self._tokenizer, processed.prompt_token_ids, params.stop,
                    params.include_stop_str_in_output,
                )
            )
            if processed.resumed_token_ids:
                _replay(detok, processed.resumed_token_ids)
            sample = _Sample(i, detok, criteria=self._sample_criteria(params))
            if params.logprobs is not None:
                sample.logprobs, sample.cumulative_logprob = [], 0.0
            state.samples.append(sample)
            state.core_ids.append(core_req.request_id)
            self._samples[core_req.request_id] = (state, sample)
        self._requests[processed.request_id] = state

    def process_outputs(self, outputs: Sequence[EngineCoreOutput]) -> ProcessedOutputs:
        """Apply one step's core outputs; outputs of unknown (finished, aborted) ids are ignored."""
        touched: dict[str, tuple[_RequestState, list[_Sample]]] = {}
        to_abort: list[str] = []
        for out in outputs:
            entry = self._samples.get(out.request_id)
            if entry is None or entry[1].finished:
                continue
            state, sample = entry
            state.device_s += out.device_s
            if out.num_cached_tokens > state.num_cached_tokens:
                state.num_cached_tokens = out.num_cached_tokens
            if out.prompt_logprobs is not None:
                state.prompt_logprobs = [None, *map(self._logprob_entry, out.prompt_logprobs)]
            if out.embedding is not None:
                state.embedding = list(out.embedding)
            if self._apply(sample, out, state.params) and not out.finished:
                to_abort.append(out.request_id)
            touched.setdefault(state.request_id, (state, []))[1].append(sample)
        request_outputs = []
        for state, changed in touched.values():
            result = self._make_output(state, changed)
            if result is not None:
                request_outputs.append(result)
            if state.finished:
                self._forget(state)
        return ProcessedOutputs(request_outputs, to_abort)

    def abort_request(self, request_id: str) -> tuple[list[str], RequestOutput | None]:
        """Stop tracking a request: (its unfinished core request ids, its final output or None)."""
        state = self._requests.get(request_id)
        if state is None:
            return [], None
        core_ids = [cid for cid, s in zip(state.core_ids, state.samples, strict=True) if not s.finished]
        changed = [s for s in state.samples if not s.finished]
        for sample in changed:
            sample.finish_reason = FinishReason.ABORT.value
            sample.detokenizer.finish()
        result = self._make_output(state, changed)
        self._forget(state)
        return core_ids, result

    def _apply(self, sample: _Sample, out: EngineCoreOutput, params: SamplingParams) -> bool:
        """Add a core output's tokens to a sample; True if a stop string ended it."""
        for i, token_id in enumerate(out.new_token_ids):
            sample.token_ids.append(token_id)
            if sample.logprobs is not None and i < len(out.new_logprobs):
                self._add_logprobs(sample, out.new_logprobs[i])
            if sample.detokenizer.add_token(token_id):
                sample.finish_reason = FinishReason.STOP.value
                sample.stop_reason = sample.detokenizer.stop_reason
                return True  # tokens after the one completing the stop string are dropped
            if sample.criteria is not None:
                name = sample.criteria.check(sample.token_ids, sample.detokenizer.text)
                if name is not None:  # a stopping criterion (plug-in) ends it after this token
                    sample.finish_reason, sample.stop_reason = FinishReason.STOP.value, name
                    sample.detokenizer.finish()
                    return True
        if out.finish_reason is not None:
            sample.finish_reason = out.finish_reason.value
            # vLLM's rule: one of the request's stop_token_ids is the stop reason; the model's
            # end-of-sequence token is none (the core reports either as stop_token_id).
            if out.stop_token_id is not None and out.stop_token_id in params.stop_token_ids:
                sample.stop_reason = out.stop_token_id
            sample.detokenizer.finish()
        return False

    def _sample_criteria(self, params: SamplingParams) -> SampleCriteria | None:
        if not params.stopping_criteria:
            return None
        if self._criteria is None:
            self._criteria = stopping_criterion_registry()
        return SampleCriteria(params.stopping_criteria, self._criteria)

    def _add_logprobs(self, sample: _Sample, lp: TokenLogprobs) -> None:
        assert sample.logprobs is not None and sample.cumulative_logprob is not None
        sample.logprobs.append(self._logprob_entry(lp))
        sample.cumulative_logprob += lp.logprob

    def _logprob_entry(self, lp: TokenLogprobs) -> dict[int, Logprob]:
        """The chosen token and the top-N alternatives, by id (vLLM's logprobs entry)."""
        entry = {lp.token_id: Logprob(lp.logprob, lp.rank, self._decode_token(lp.token_id))}
        for rank, (token_id, logprob) in enumerate(lp.top, start=1):
            if token_id not in entry:
                entry[token_id] = Logprob(logprob, rank, self._decode_token(token_id))
        return entry

    def _decode_token(self, token_id: int) -> str | None:
        if self._tokenizer is None:
            return None
        text = self._token_text.get(token_id)
        if text is None:
            text = str(self._tokenizer.decode([token_id]))
            self._token_text[token_id] = text
        return text

    def _make_output(self, state: _RequestState, changed: list[_Sample]) -> RequestOutput | None:
        if state.kind is OutputKind.FINAL_ONLY and not state.finished:
            return None
        if state.kind is OutputKind.DELTA:
            completions = [self._delta(s) for s in sorted(changed, key=lambda s: s.index)]
        else:
            completions = [self._cumulative(s) for s in state.samples]
        prompt_logprobs = state.prompt_logprobs
        if state.kind is OutputKind.DELTA and prompt_logprobs is not None:
            if state.prompt_logprobs_sent:
                prompt_logprobs = None
            state.prompt_logprobs_sent = True
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=completions,
            finished=state.finished,
            num_cached_tokens=state.num_cached_tokens,
            device_s=state.device_s,
            prompt_logprobs=prompt_logprobs,
            embedding=state.embedding,
        )

    @staticmethod
    def _cumulative(s: _Sample) -> CompletionOutput:
        return CompletionOutput(
            s.index,
            s.detokenizer.text,
            list(s.token_ids),
            s.cumulative_logprob,
            None if s.logprobs is None else list(s.logprobs),
            s.finish_reason,
            s.stop_reason,
        )

    @staticmethod
    def _delta(s: _Sample) -> CompletionOutput:
        start, s.num_sent_tokens = s.num_sent_tokens, len(s.token_ids)
        return CompletionOutput(
            s.index,
            s.detokenizer.take_delta(),
            s.token_ids[start:],
            s.cumulative_logprob,
            None if s.logprobs is None else s.logprobs[start:],
            s.finish_reason,
            s.stop_reason,
        )

    def _forget(self, state: _RequestState) -> None:
        self._requests.pop(state.request_id, None)
        for cid in state.core_ids:
            self._samples.pop(cid, None)


def _replay(detok: IncrementalDetokenizer | TokenIdsOnly, token_ids: Sequence[int]) -> None:
    """Feed a resumed stream's earlier outputs to its detokenizer and drop their text (the
    client has it): the detokenizer is then exactly where the first worker's was, held-back
    bytes of an unfinished character and a possible stop-string prefix included, so the text
    continues without a repeated or missing character at the seam."""
    for token_id in token_ids:
        detok.add_token(token_id)
    detok.take_delta()


def merge_deltas(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One DELTA output equal to ``earlier`` followed by ``later`` (same request).

    A stream whose consumer falls behind the engine sends one message for all the steps it
    missed instead of one per step (vLLM's ``RequestOutputCollector`` does the same).
    """
    merged = {c.index: c for c in earlier.outputs}
    for c in later.outputs:
        prev = merged.get(c.index)
        if prev is None:
            merged[c.index] = c
            continue
        logprobs = None if prev.logprobs is None or c.logprobs is None else prev.logprobs + c.logprobs
        merged[c.index] = CompletionOutput(
            c.index,
            prev.text + c.text,
            prev.token_ids + c.token_ids,
            c.cumulative_logprob,
            logprobs,
            c.finish_reason,
            c.stop_reason,
        )
    return RequestOutput(
        request_id=later.request_id,
        prompt=earlier.prompt,
        prompt_token_ids=earlier.prompt_token_ids,
        outputs=[merged[i] for i in sorted(merged)],
        finished=later.finished,
        num_cached_tokens=max(earlier.num_cached_tokens, later.num_cached_tokens),
        device_s=later.device_s,  # cumulative
        prompt_logprobs=(
            earlier.prompt_logprobs if earlier.prompt_logprobs is not None else later.prompt_logprobs
        ),
        embedding=later.embedding if later.embedding is not None else earlier.embedding,
    )
