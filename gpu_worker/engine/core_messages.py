"""What the front sends the engine core, and what one turn of the core's busy loop reports.

The same messages travel through a thread's queue (:class:`~gpu_worker.engine.core_client.
ThreadCoreClient`) and through a pipe to a child process (:class:`~gpu_worker.engine.
core_client.ProcessCoreClient`); only the process pickles them (a local pipe between the
worker and its own child: nothing from the network is ever unpickled). A
:class:`StepResult` pickles its outputs as a few flat columns (:class:`PackedOutputs`), not as
one dataclass per request.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from typing import Any

from gpu_worker.config import EngineConfig
from gpu_worker.core.types import (
    EngineCoreOutput,
    EngineCoreRequest,
    FinishReason,
    SchedulerStats,
    TokenLogprobs,
)
from gpu_worker.engine.image_inputs import ImageInputs
from llmserve.kv_events import KVEvent

# ---------------------------------------------------------------------- commands


@dataclass(frozen=True)
class AddRequest:
    """The core requests of one user request (``n`` samples): added all or none."""

    request_id: str
    core_requests: tuple[EngineCoreRequest, ...]


@dataclass(frozen=True)
class AbortRequests:
    """Finish these core requests with ABORT and free their KV blocks (unknown ids are ignored)."""

    core_ids: tuple[str, ...]


@dataclass(frozen=True)
class QueryCachedHashes:
    """Ask for every cached block hash (a full resync of the router's index); answered in
    :attr:`StepResult.replies` under ``query_id``."""

    query_id: int


@dataclass(frozen=True)
class ResetPrefixCache:
    """Forget every cached block (only while no request holds blocks); the reply is whether it did."""

    query_id: int


@dataclass(frozen=True)
class LoadLora:
    """Load a LoRA adapter at run time (``EngineCore.load_lora_adapter``); the reply is None, or
    the ``LoraUpdateError`` / ``ValueError`` that refused it."""

    query_id: int
    name: str
    path: str


@dataclass(frozen=True)
class UnloadLora:
    """Stop serving a LoRA adapter (``EngineCore.unload_lora_adapter``); reply as :class:`LoadLora`'s."""

    query_id: int
    name: str


@dataclass(frozen=True)
class Shutdown:
    """Stop the busy loop."""


Command = AddRequest | AbortRequests | QueryCachedHashes | ResetPrefixCache | LoadLora | UnloadLora | Shutdown


# ---------------------------------------------------------------------- results


@dataclass(frozen=True)
class AddFailed:
    """An :class:`AddRequest` the scheduler refused (none of its core requests stayed)."""

    request_id: str
    error: BaseException


@dataclass(frozen=True)
class PackedOutputs:
    """One step's :class:`EngineCoreOutput` list as flat columns (cheap to pickle).

    ``extras`` holds, sparsely, what most outputs lack: ``(row, new_logprobs, finish_reason,
    stop_token_id, prompt_logprobs, embedding)`` for rows with logprobs, a finish reason, a stop
    token, prompt logprobs or an embedding.
    """

    request_ids: list[str]
    new_token_ids: list[tuple[int, ...]]
    num_cached_tokens: list[int]
    device_s: list[float]
    extras: list[
        tuple[int, tuple[TokenLogprobs, ...], str | None, int | None, tuple[TokenLogprobs, ...] | None,
              tuple[float, ...] | None]
    ]

    @staticmethod
    def pack(outputs: list[EngineCoreOutput]) -> PackedOutputs:
        extras = [
            (row, o.new_logprobs, None if o.finish_reason is None else o.finish_reason.value, o.stop_token_id,
             o.prompt_logprobs, o.embedding)
            for row, o in enumerate(outputs)
            if o.new_logprobs or o.finish_reason is not None or o.stop_token_id is not None
            or o.prompt_logprobs is not None or o.embedding is not None
        ]
        return PackedOutputs(
            [o.request_id for o in outputs],
            [o.new_token_ids for o in outputs],
            [o.num_cached_tokens for o in outputs],
            [o.device_s for o in outputs],
            extras,
        )

    def unpack(self) -> list[EngineCoreOutput]:
        outputs = [
            EngineCoreOutput(rid, tokens, num_cached_tokens=cached, device_s=device_s)
            for rid, tokens, cached, device_s in zip(
                self.request_ids, self.new_token_ids, self.num_cached_tokens, self.device_s, strict=True
            )
        ]
        for row, logprobs, reason, stop_token_id, prompt_logprobs, embedding in self.extras:
            outputs[row] = EngineCoreOutput(
                self.request_ids[row],
                self.new_token_ids[row],
                new_logprobs=logprobs,
                finish_reason=FinishReason(reason) if reason is not None else None,
                num_cached_tokens=self.num_cached_tokens[row],
                stop_token_id=stop_token_id,
                device_s=self.device_s[row],
                prompt_logprobs=prompt_logprobs,
                embedding=embedding,
            )
        return outputs


@dataclass(frozen=True)
class StepResult:
    """One turn of the busy loop: what it applied, and the step's outputs if it stepped.

    ``stats`` is None when the snapshot was held back (nothing the front shows changed; the
    front keeps its last one). ``num_applied_adds`` counts the core requests this turn took
    from the inbox, so the front can stop counting them as queued.
    """

    outputs: list[EngineCoreOutput]
    stats: SchedulerStats | None
    kv_events: list[KVEvent]
    num_applied_adds: int
    failed_adds: list[AddFailed] = field(default_factory=list)
    replies: list[tuple[int, Any]] = field(default_factory=list)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["outputs"] = PackedOutputs.pack(self.outputs)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["outputs"] = state["outputs"].unpack()
        for name, value in state.items():
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class CoreInfo:
    """What the front needs to know of a loaded core (a child process sends it when ready)."""

    config: EngineConfig  # the effective one (max_model_len filled in)
    tokenizer: Any
    vocab_size: int
    max_model_len: int
    eos_token_ids: frozenset[int]
    stats: SchedulerStats
    weight_bytes: int = 0  # the model's weights over all ranks, as stored
    images: ImageInputs | None = None  # a model that takes images: their preprocessing


@dataclass(frozen=True)
class Failed:
    """Start-up or a step raised: the loop (or the child) ends after reporting this."""

    error: BaseException


def take_commands(inbox: queue.SimpleQueue[Command] | queue.Queue[Command], block: bool) -> list[Command]:
    """Every command waiting in ``inbox``; with ``block``, wait for at least one first."""
    taken: list[Command] = [inbox.get()] if block else []
    while True:
        try:
            taken.append(inbox.get_nowait())
        except queue.Empty:
            return taken
