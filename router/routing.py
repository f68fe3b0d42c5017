"""The router's decisions in domain terms: which model, which token ids, which workers.

No protobuf here: the servicer decodes requests into these calls, and the dispatcher
forwards the stream to the ranked workers.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llmserve.fleet import FleetSnapshot, Registry, WorkerRecord
from llmserve.hashing import block_hashes
from llmserve.limits import LimitExceeded, RequestLimits, flag_of
from llmserve.multimodal import ImageSpan
from llmserve.prompt_input import ChatPrompt, PromptInput, input_field, truncate_prompt
from llmserve.sampling_extras import check_sampling_limits
from llmserve.v1 import generation_pb2 as gen_pb
from router.dispatch import InflightTracker
from router.errors import InvalidRequest, LimitRefused, ModelNotFound, ModelUnavailable, WorkersBusy
from router.images import check_takes_images, expand_images
from router.policy import Candidate, Policy, Ranked, RouteQuery
from router.tokenizers import TokenizerCache

log = logging.getLogger(__name__)

# After its cached view failed (no live worker, or every candidate unreachable), a router reads
# the registry again if its last read is older than this: a worker died and a standby may have
# been promoted. It also bounds how often a failing model's requests read the store.
FRESH_VIEW_S = 0.1


@dataclass(frozen=True)
class ModelSummary:
    """One live model for ListModels (``num_standby_workers``: its warm standbys). Its workers'
    weight format and KV cache dtype (distinct values joined by ","), their largest weight size
    and smallest KV pool in tokens. ``parent``: the base model of a LoRA adapter, "" for a base
    model."""

    name: str
    max_model_len: int
    num_workers: int
    num_standby_workers: int = 0
    quantization: str = ""
    kv_cache_dtype: str = ""
    weight_bytes: int = 0
    kv_cache_tokens: int = 0
    parent: str = ""


class Router:
    """Resolves models to live workers, admits, tokenizes, and ranks workers with the policy.

    ``limits`` (``llmserve.limits``) are checked by :meth:`admit` before the prompt costs
    anything; :meth:`token_ids` refuses a prompt over the context, naming the field the client
    sent (a worker only sees ``prompt_token_ids``)."""

    def __init__(
        self, registry: Registry, tokenizers: TokenizerCache, policy: Policy, tracker: InflightTracker,
        limits: RequestLimits | None = None,
    ) -> None:
        self.registry = registry
        self.tokenizers = tokenizers
        self.policy = policy
        self.tracker = tracker
        self.limits = limits if limits is not None else RequestLimits()

    def admit(self, request_id: str, prompt: PromptInput, sampling: gen_pb.SamplingParams,
              num_images: int = 0) -> None:
        """Request id, ``n``, stop strings, the structured-output format's size and nesting, chat
        turns, prompt characters and images within the limits, else :class:`LimitRefused`
        (INVALID_ARGUMENT) naming the field, the limit and its flag."""
        try:
            self.limits.check_images(num_images)
            self.limits.check_request_id(request_id)
            check_sampling_limits(self.limits, sampling)
            self.limits.check_prompt(prompt)
        except LimitExceeded as exc:
            raise LimitRefused(exc.limit, str(exc)) from None

    async def resolve(self, model: str) -> tuple[str, list[WorkerRecord]]:
        """(model name, its live workers); NOT_FOUND / UNAVAILABLE / INVALID_ARGUMENT otherwise.
        A LoRA adapter's name resolves to the workers that have it; no name, to the one base
        model when only one is live (as vLLM: its adapters need their names)."""
        snap = await self.registry.snapshot()
        live = snap.live_models()
        if not model:
            bases = [name for name in live if not snap.parent_of(name)]  # a lone model's adapters aside
            if len(bases) == 1:
                model = bases[0]
            else:
                raise InvalidRequest(f"model is required; available models: {sorted(live)}")
        workers = snap.workers_of(model)
        if not workers and model in snap.models:  # the cached view may be behind a promotion
            workers = (await self.registry.recent(FRESH_VIEW_S)).workers_of(model)
        if workers:
            return model, workers
        if model in snap.models:
            raise ModelUnavailable(model)
        raise ModelNotFound(model, live)

    async def token_ids(self, model: str, workers: Sequence[WorkerRecord], prompt: PromptInput,
                        truncate: int | None = None, images: Sequence[bytes] = ()) -> list[int]:
        """The prompt's token ids, tokenized exactly as the model's workers would, and cut to
        their last ``truncate`` (``truncate_prompt_tokens``) as the workers would; a prompt that
        leaves no room for an output token in the smallest context of ``workers`` is refused
        (:class:`LimitRefused`, limit ``max_model_len``) naming the field the client sent.
        With ``images``, each image token becomes its run of tokens, as the workers expand it
        (``llmserve.multimodal``), so the context arithmetic counts what the workers run."""
        if isinstance(prompt, ChatPrompt | str) or images:
            tok = await self.tokenizers.get(model, workers)
            if images:  # before the template renders a text model's chat with image parts
                check_takes_images(model, tok.image_tokens, truncate)
            ids = await asyncio.to_thread(tok.encode, prompt) if isinstance(prompt, ChatPrompt | str) \
                else list(prompt)
            if images or tok.image_tokens is not None:
                ids = expand_images(model, tok.image_tokens, ids, len(images), input_field(prompt), truncate)
        else:
            ids = list(prompt)
        context = min((w.max_model_len for w in workers), default=0)
        if workers and truncate is not None:
            try:
                ids = list(truncate_prompt(ids, truncate, context))
            except ValueError as exc:
                raise InvalidRequest(str(exc)) from None
        if workers and len(ids) >= context:
            raise LimitRefused("max_model_len", (
                f"{input_field(prompt)} is too long: {len(ids)} tokens; the model's context (max_model_len, "
                f"flag {flag_of('max_model_len')} of its workers) is {context} tokens, which must leave room "
                "for at least one output token"))
        return ids

    async def rank(self, model: str, workers: Sequence[WorkerRecord], token_ids: Sequence[int],
                   request_id: str, images: Sequence[ImageSpan] = ()) -> Ranked:
        """Candidates best first; RESOURCE_EXHAUSTED when all are over their queue limit.
        ``images``: the prompt's image spans (their hashes join the prefix hashes, as on workers)."""
        chains = self._chains(model, workers, token_ids, images) if self.policy.uses_prefix else {}
        matched: Mapping[str, int] = await self.registry.longest_prefixes(chains) if chains else {}
        candidates = [
            Candidate(w, matched.get(w.worker_id, 0), self.tracker.unreported(w)) for w in workers
        ]
        open_ = [c for c in candidates if not c.full]
        if not open_:
            raise WorkersBusy(model)
        first = chains[workers[0].worker_id][:1] if chains else []
        query = RouteQuery(
            model=model,
            prompt_blocks=len(token_ids) // max(1, workers[0].block_size),
            affinity_key=first[0] if first else _digest(token_ids),
            request_key=request_id.encode(),
        )
        ranked = self.policy.rank(query, open_)
        log.debug("route %s -> %s (%s) scores=%s", request_id, [w.worker_id for w in ranked.workers],
                  ranked.reason, ranked.scores)
        return ranked

    @staticmethod
    def _chains(
        model: str, workers: Sequence[WorkerRecord], token_ids: Sequence[int],
        images: Sequence[ImageSpan] = (),
    ) -> dict[str, list[bytes]]:
        by_block_size: dict[int, list[bytes]] = {}
        out: dict[str, list[bytes]] = {}
        for w in workers:
            chain = by_block_size.get(w.block_size)
            if chain is None:
                # Seeded with the requested name, an adapter's own name for a LoRA adapter, as the
                # worker seeds that request's blocks: adapters and their base model never share
                # cached blocks (their K/V differ), so a prefix never matches across them.
                chain = block_hashes(token_ids, w.block_size, seed=model, images=images)
                by_block_size[w.block_size] = chain
            out[w.worker_id] = chain
        return out

    async def fresh_workers(self, model: str, tried: Sequence[WorkerRecord]) -> list[WorkerRecord]:
        """Live workers of ``model`` not in ``tried``, from a view at most ``FRESH_VIEW_S`` old."""
        seen = {w.worker_id for w in tried}
        snap = await self.registry.recent(FRESH_VIEW_S)
        return [w for w in snap.workers_of(model) if w.worker_id not in seen]

    async def list_models(self) -> list[ModelSummary]:
        """Models with a live worker, with their standby capacity (a model with standbys only is
        about to have one promoted, and is not listed until then). A LoRA adapter is listed as a
        model of its own, its workers those that have it, with its base model as ``parent``."""
        snap: FleetSnapshot = await self.registry.snapshot()
        standby = snap.standby_counts()
        return [
            ModelSummary(
                name, min(w.max_model_len for w in ws), len(ws), standby.get(name, 0),
                ",".join(sorted({w.quantization for w in ws} - {""})),
                ",".join(sorted({w.kv_cache_dtype for w in ws} - {""})),
                max(w.weight_bytes for w in ws),
                min(w.load.num_kv_blocks * w.block_size for w in ws),
                snap.parent_of(name),
            )
            for name, ws in sorted(snap.live_models().items())
        ]


def _digest(token_ids: Sequence[int]) -> bytes:
    return hashlib.blake2b(repr(list(token_ids[:64])).encode(), digest_size=16).digest()
