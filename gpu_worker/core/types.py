"""Frozen records exchanged between the engine core's collaborators.

Flow of one step: ``Scheduler.schedule() -> SchedulerOutput``;
``ModelRunner.execute(SchedulerOutput) -> RunnerOutput``;
``Scheduler.update(SchedulerOutput, RunnerOutput) -> list[EngineCoreOutput]``.
No collaborator writes another's state: each keeps its own and learns from these records.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from types import MappingProxyType
from typing import Any

from gpu_worker.sampling_params import SamplingParams
from llmserve.multimodal import ImageSpan

# In ``ScheduledRequest.token_ids``: the token the step in flight samples for this request
# (async scheduling). The runner fills it in on the device from that step's sampled ids.
PLACEHOLDER_TOKEN_ID = -1


class FinishReason(str, enum.Enum):
    """Why a sequence ended (string values as in vLLM / OpenAI)."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context length
    ABORT = "abort"  # cancelled by the client, a deadline or a drain


@dataclass(frozen=True)
class ImageInput:
    """One image of a prompt, ready for the model: where its placeholder run lies (``span``, with
    the image's hash) and its preprocessed ``pixel_values`` (a float32 ``[3, H, W]`` CPU tensor:
    core/ stays free of torch, so typed Any). Never mutated after the front built it."""

    span: ImageSpan
    pixel_values: Any


@dataclass(frozen=True)
class EngineCoreRequest:
    """A validated, tokenized request as the engine core receives it (one sequence: n == 1;
    the front fans n > 1 out into n core requests)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = 0.0
    priority: int = 0  # lower runs first; FCFS among equals
    # Outputs generated before this request reached this engine (a stream resumed after its
    # worker failed): the request starts as a preempted one would resume, so max_tokens,
    # min_tokens, penalties and seeded draws count them.
    output_token_ids: tuple[int, ...] = ()
    # The LoRA adapter the request runs with ("": the base model); also its prefix-cache
    # namespace (its blocks hash from the adapter's name, as the router hashes them).
    lora_name: str = ""
    # The prompt's images, in the order of their spans (a model that takes images).
    images: tuple[ImageInput, ...] = ()


@dataclass(frozen=True)
class ScheduledRequest:
    """What the runner must compute for one request this step.

    ``token_ids`` are the tokens whose K/V are computed this step, at positions
    ``start_pos .. start_pos + len(token_ids) - 1``. For a request new to the runner
    (first schedule, or resumed after preemption) ``is_new`` is True, ``block_ids`` is its
    whole block table and ``params`` / ``prompt_len`` / ``output_token_ids`` /
    ``prompt_token_ids`` are set;
    otherwise ``block_ids`` holds only the blocks appended this step. ``sample`` is True
    when this step reaches the end of the request's tokens, so a new token must be
    sampled from the last position. With async scheduling the last entry of ``token_ids``
    may be :data:`PLACEHOLDER_TOKEN_ID`: the token the previous step samples for this
    request, unknown on the host when this step is planned.

    Speculative decoding: the last ``num_draft_tokens`` entries of ``token_ids`` are draft
    tokens (``sample`` is then True). The runner computes logits at each of the last
    ``1 + num_draft_tokens`` positions, accepts the longest prefix of drafts the target agrees
    with and samples one more token after it (:class:`RunnerOutput`).
    """

    req_id: str
    token_ids: tuple[int, ...]
    start_pos: int
    block_ids: tuple[int, ...]
    sample: bool
    is_new: bool = False
    params: SamplingParams | None = None
    prompt_len: int = 0
    output_token_ids: tuple[int, ...] = ()  # tokens generated before a preemption (for penalties)
    prompt_token_ids: tuple[int, ...] = ()  # whole prompt when is_new (repetition penalty sees cached tokens)
    num_draft_tokens: int = 0  # speculative decoding: drafts at the end of token_ids
    lora_name: str = ""  # when is_new: the request's LoRA adapter ("": none)
    images: tuple[ImageInput, ...] = ()  # when is_new: the prompt's images (their features fill their spans)

    @classmethod
    def for_known(
        cls, req_id: str, token_ids: tuple[int, ...], start_pos: int, block_ids: tuple[int, ...],
        sample: bool, num_draft_tokens: int = 0,
    ) -> ScheduledRequest:
        """``ScheduledRequest(req_id, token_ids, start_pos, block_ids, sample,
        num_draft_tokens=num_draft_tokens)`` (a request the runner already knows), built ~4x
        faster: the scheduler builds one per running request per step (:func:`_fast_record`; its
        loop without drafts inlines this, from :meth:`field_defaults`)."""
        values = _SCHEDULED_DEFAULTS.copy()
        values["req_id"] = req_id
        values["token_ids"] = token_ids
        values["start_pos"] = start_pos
        values["block_ids"] = block_ids
        values["sample"] = sample
        values["num_draft_tokens"] = num_draft_tokens
        return _fast_record(cls, values)

    @staticmethod
    def field_defaults() -> dict[str, Any]:
        """A new dict of every field with its default, in field order: the template of a loop
        that inlines ``for_known`` (``Scheduler._schedule_running_fast``, one copy per record;
        a plain dict copies faster than ``for_known``'s read-only one)."""
        return dict(_SCHEDULED_DEFAULTS)

    @property
    def read_whole(self) -> bool:
        """Whether the runner must read this record whole, not only its columns
        (:attr:`StepColumns.changed`): it is new to the runner, or brings blocks."""
        return self.is_new or bool(self.block_ids)


def _record_defaults(cls: type) -> MappingProxyType[str, Any]:
    """Every field of a frozen dataclass with its plain default (None where it has none; no
    field may have a ``default_factory``): the template of :func:`_fast_record`."""
    out = {}
    for f in fields(cls):
        if f.default_factory is not MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: _fast_record needs plain defaults")
        out[f.name] = None if f.default is MISSING else f.default
    return MappingProxyType(out)  # read-only: each record gets a copy


def _fast_record(cls: type[Any], values: dict[str, Any]) -> Any:
    """An instance of the frozen dataclass ``cls`` holding ``values`` (one entry per field),
    equal to the one its generated ``__init__`` builds, without that ``__init__``'s one
    ``object.__setattr__`` call per field (~1 us per record on CPython 3.11). For records built
    per request per step (``ScheduledRequest``, ``EngineCoreOutput``); ``__post_init__`` is not
    run, so only for classes that have none."""
    obj = object.__new__(cls)
    object.__setattr__(obj, "__dict__", values)
    return obj


_SCHEDULED_DEFAULTS = _record_defaults(ScheduledRequest)


@dataclass(frozen=True)
class GrammarBitmask:
    """Structured output of one step: the tokens each constrained request may sample next.

    ``bitmask`` is an int32 numpy array ``[len(req_ids), ceil(vocab / 32)]``: bit ``t % 32`` of
    word ``t // 32`` is set when token ``t`` is allowed. Filled by the engine core (grammar
    matchers, CPU) for the sampled requests that have structured output; the runner applies it
    to their logits rows in one device op.
    """

    req_ids: tuple[str, ...]
    bitmask: Any  # numpy int32 [sum(row_counts), words]: core/ stays free of numpy and torch
    # Rows per request, consecutive in req_ids order (speculative decoding: 1 + its drafts, one
    # mask per verified position); empty: one row each.
    row_counts: tuple[int, ...] = ()


@dataclass(frozen=True)
class StepColumns:
    """A step's ``ScheduledRequest`` records as parallel columns, in the same order.

    What the per-step consumers of a plan read (the runner's state update and input
    preparation, ``Scheduler.update``): one sequence per field instead of attribute reads on
    every record, which at 256 decodes per step was most of their host time. ``token_ids``
    holds every record's tokens back to back (``num_tokens`` of each). ``changed`` are the
    indices of the records the runner must read whole: new to it (``is_new``) or with blocks
    appended this step (a decode crosses a block boundary every ``block_size`` steps).
    """

    req_ids: tuple[str, ...]
    num_tokens: tuple[int, ...]
    start_pos: tuple[int, ...]
    token_ids: tuple[int, ...]
    sample: tuple[bool, ...]
    num_draft_tokens: tuple[int, ...]
    changed: tuple[int, ...]

    @classmethod
    def of(cls, requests: Sequence[ScheduledRequest]) -> StepColumns:
        """The columns of ``requests`` (the reference the scheduler's own columns must equal)."""
        return cls(
            req_ids=tuple(r.req_id for r in requests),
            num_tokens=tuple(len(r.token_ids) for r in requests),
            start_pos=tuple(r.start_pos for r in requests),
            token_ids=tuple(t for r in requests for t in r.token_ids),
            sample=tuple(r.sample for r in requests),
            num_draft_tokens=tuple(r.num_draft_tokens for r in requests),
            changed=tuple(i for i, r in enumerate(requests) if r.read_whole),
        )


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's plan. ``requests`` order is the order of rows in the flat batch.

    ``columns``: the same plan as :class:`StepColumns`, when its maker built them alongside
    the records (the scheduler does); :meth:`step_columns` derives them otherwise. Not
    compared: two plans with equal records are equal.
    """

    requests: tuple[ScheduledRequest, ...]
    num_scheduled_tokens: int
    finished_req_ids: frozenset[str] = frozenset()  # runner drops their state
    preempted_req_ids: frozenset[str] = frozenset()  # runner drops their block tables
    grammar: GrammarBitmask | None = None  # set by the engine core when a sampled row is constrained
    columns: StepColumns | None = field(default=None, compare=False, repr=False)

    @property
    def is_empty(self) -> bool:
        return not self.requests

    def step_columns(self) -> StepColumns:
        """``columns``, or the columns of ``requests`` when none were given."""
        return self.columns if self.columns is not None else StepColumns.of(self.requests)


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprob of the chosen token and the top-N alternatives (raw model distribution)."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class PromptLogprobs:
    """Prompt logprobs one step computed for one request (``SamplingParams.prompt_logprobs``):
    ``logprobs[i]`` is that of the prompt token at position ``first + i`` (``first >= 1``),
    given the tokens before it."""

    req_id: str
    first: int
    logprobs: tuple[TokenLogprobs, ...]


@dataclass(frozen=True)
class RunnerOutput:
    """Sampled tokens, for the requests of the step whose ``sample`` flag was True, in order.

    Speculative decoding: ``accepted_draft_ids[i]`` are the draft tokens of request ``i`` the
    target accepted, in order; its new tokens are those followed by ``sampled_token_ids[i]``
    (the target's own token after the last accepted draft), and ``accepted_logprobs[i]`` holds
    the accepted drafts' logprobs when the request asked for them. Both are empty when no
    request of the step had drafts.

    ``prompt_logprobs``: those the step computed, for the requests that asked for them and
    had prompt positions in it (sampled or not).
    """

    req_ids: tuple[str, ...]
    sampled_token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs | None, ...] = ()
    accepted_draft_ids: tuple[tuple[int, ...], ...] = ()
    accepted_logprobs: tuple[tuple[TokenLogprobs, ...], ...] = ()
    prompt_logprobs: tuple[PromptLogprobs, ...] = ()
    # A pooling runner's step: each sampled request's embedding (its token is a placeholder 0).
    pooled: tuple[tuple[float, ...], ...] = ()


@dataclass(frozen=True)
class EngineCoreOutput:
    """What happened to one request in one step, as reported to the front."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_logprobs: tuple[TokenLogprobs, ...] = ()
    finish_reason: FinishReason | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    stop_token_id: int | None = None
    # Device seconds attributed to the request since its previous output (its share of each
    # step's time, split by tokens: ``Scheduler.update``); a finishing output carries the rest.
    device_s: float = 0.0
    # The whole prompt's logprobs (positions 1 ..), once, on the request's first sampled output,
    # when it asked for them (``SamplingParams.prompt_logprobs``).
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None
    embedding: tuple[float, ...] | None = None  # a pooling runner's result (its only output)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def fast(
        cls, request_id: str, new_token_ids: tuple[int, ...], new_logprobs: tuple[TokenLogprobs, ...],
        finish_reason: FinishReason | None, num_cached_tokens: int, stop_token_id: int | None,
        device_s: float, prompt_logprobs: tuple[TokenLogprobs, ...] | None = None,
        embedding: tuple[float, ...] | None = None,
    ) -> EngineCoreOutput:
        """The same record as the constructor with these (all) fields, built ~3x faster:
        ``Scheduler.update`` builds one per sampled request per step (:func:`_fast_record`; its
        loop over a plan's columns inlines this)."""
        return _fast_record(cls, {
            "request_id": request_id,
            "new_token_ids": new_token_ids,
            "new_logprobs": new_logprobs,
            "finish_reason": finish_reason,
            "num_cached_tokens": num_cached_tokens,
            "stop_token_id": stop_token_id,
            "device_s": device_s,
            "prompt_logprobs": prompt_logprobs,
            "embedding": embedding,
        })


@dataclass(frozen=True)
class SpecDecodeStats:
    """Speculative decoding counters (cumulative), as vLLM's ``spec_decode_*`` metrics.

    ``num_drafts``: requests-steps that verified drafts; ``num_draft_tokens``: drafts verified;
    ``num_accepted_tokens``: of which the target accepted; ``num_accepted_tokens_per_pos[i]``:
    drafts accepted at position ``i`` (0 = the first draft of a step), so its ratio to
    ``num_drafts`` is the acceptance rate at that position.
    """

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: tuple[int, ...] = ()

    @property
    def acceptance_rate(self) -> float:
        """Accepted over verified drafts (0 when none was verified)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


@dataclass(frozen=True)
class SchedulerStats:
    """Point-in-time load, for health, heartbeats and metrics."""

    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV blocks in use by requests (0..1)
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queries: int = 0  # prompt tokens looked up (cumulative)
    prefix_cache_hits: int = 0  # of which found cached (cumulative)
    num_preemptions: int = 0  # cumulative
    num_waiting_tokens: int = 0  # tokens of the requests waiting for their first admission
    device_seconds: float = 0.0  # step time attributed to requests (cumulative; Scheduler.update)
    extra: dict[str, float] = field(default_factory=dict)
    spec_decode: SpecDecodeStats | None = None  # None: speculative decoding is off
