"""ModelRunner: executes one scheduler step on the device (inputs -> model -> sampler)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import nn

from gpu_worker.config import EngineConfig
from gpu_worker.core.types import GrammarBitmask, RunnerOutput, ScheduledRequest, SchedulerOutput
from gpu_worker.distributed.parallel_state import IntermediateTensors, ModelParallel
from gpu_worker.lora.layers import LoraSlots
from gpu_worker.model_executor.layers.attention import AttentionMetadata
from gpu_worker.model_executor.layers.quantization.select import kv_cache_torch_dtype
from gpu_worker.model_executor.model_config import KVCacheSpec
from gpu_worker.sampling_params import SamplingParams
from gpu_worker.spec_decode.verify_step import verify_drafts
from gpu_worker.worker.cuda_graphs import DecodeGraphs, decode_buckets
from gpu_worker.worker.image_features import ImageFeatures
from gpu_worker.worker.kv_scales import KVScaleCalibration
from gpu_worker.worker.logits_processing import LogitsProcessing
from gpu_worker.worker.mixed_graphs import MixedGraphs, PiecewiseCapture, mixed_buckets
from gpu_worker.worker.prompt_logprobs import compute_prompt_logprobs, plan_prompt_logprobs
from gpu_worker.worker.request_state import RequestStates
from gpu_worker.worker.sampler import Sampler, SamplerOutput
from gpu_worker.worker.sampling_metadata import build_sampling_metadata
from gpu_worker.worker.step_inputs import StepInputBuffers, StepInputs
from kernels import greedy_argmax

_EMPTY_OUTPUT = RunnerOutput(req_ids=(), sampled_token_ids=())


class PendingRunnerOutput:
    """The :class:`RunnerOutput` of a launched step, whose sampled ids may still be on their
    way to the host. :meth:`result` waits for them (and nothing else) the first time and
    returns the same object after."""

    def __init__(self, finalize: Callable[[], RunnerOutput]) -> None:
        self._finalize: Callable[[], RunnerOutput] | None = finalize
        self._output: RunnerOutput | None = None
        # A pipeline's sampling rank takes results on a sender thread while its loop may take
        # them too (penalties): the first caller finalizes, the others wait for it.
        self._lock = threading.Lock()

    @classmethod
    def ready(cls, output: RunnerOutput) -> PendingRunnerOutput:
        pending = cls(lambda: output)
        pending.result()
        return pending

    def result(self) -> RunnerOutput:
        with self._lock:
            if self._finalize is not None:
                self._output, self._finalize = self._finalize(), None
        assert self._output is not None  # invariant: set when _finalize is cleared
        return self._output


@dataclass(frozen=True)
class _LastSample:
    """The previous step's sampled ids, on the device: placeholders of the next step read them."""

    req_ids: tuple[str, ...]
    token_ids: torch.Tensor  # [N] int64, device


class ModelRunner:
    """Owns the KV caches and the per-request device-side state; runs steps.

    ``execute_async`` (or its waiting form ``execute``) is the only per-step entry point.
    Requests enter with ``is_new`` (full block table and params) and leave through
    ``finished_req_ids`` / ``preempted_req_ids``. Nothing in a step waits for the device
    except reading the sampled token ids, which ``execute_async`` leaves to the returned
    :class:`PendingRunnerOutput`: the engine core plans and launches the next step first.
    That next step may contain placeholder tokens (async scheduling, see the scheduler):
    they are filled on the device from this step's sampled ids, so the host never needs
    them in time. Penalties count every earlier token, so a step with penalty rows first
    waits for the previous step's ids.

    On CUDA (unless ``enforce_eager``) decode-only steps replay CUDA graphs captured by
    :meth:`capture_decode_graphs` (called from :meth:`warmup`), padded to a size bucket, the
    LM head included with one tensor parallel rank (:meth:`_decode_graph_body`); steps with
    prefill chunks of up to ``mixed_graph_max_tokens`` tokens replay piecewise
    graphs (:meth:`capture_mixed_graphs`: all but the attention, which runs eagerly between the
    pieces); larger steps, and every step before capture, run eagerly.
    """

    def __init__(
        self,
        config: EngineConfig,
        model: nn.Module,
        hf_config: Any,
        device: torch.device,
        dtype: torch.dtype,
        eos_token_ids: Iterable[int],
    ) -> None:
        """``config`` must have its device defaults resolved (``EngineConfig.with_device_defaults``).
        The runner holds no KV cache until :meth:`initialize_kv_cache` (vLLM's order: build,
        :meth:`profile_run` to size the pool, then allocate it)."""
        self.config = config
        self.model = model
        self.hf_config = hf_config
        self.device = device
        self.dtype = dtype
        # The KV pool's element type: the model's, or e4m3 (kv_cache_dtype "fp8").
        self.kv_cache_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, dtype, device)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.block_size = config.block_size
        self.vocab_size = int(hf_config.vocab_size)
        self.eos_token_ids = tuple(eos_token_ids)
        parallel = getattr(model, "parallel", None)
        self.parallel: ModelParallel = parallel if isinstance(parallel, ModelParallel) else ModelParallel()
        generator = torch.Generator(device=device)
        generator.manual_seed(config.seed)
        self.sampler = Sampler(generator, greedy_argmax(device, self.vocab_size, config.max_num_seqs))
        self.logits_processing = LogitsProcessing(self.vocab_size, device)  # plug-ins, grammar masks
        self._last_sample: _LastSample | None = None
        self._pending: PendingRunnerOutput | None = None  # the newest step's output
        # Whether the step launched last reports anything (sampled rows or prompt logprobs): a
        # pipeline's sampling rank sends the driver exactly those steps' outputs. Every rank
        # derives it from the same plan and the same request states.
        self.last_step_reports = False
        self.graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        # fp8 KV scales the checkpoint lacks: computed by the first real step (worker/kv_scales.py).
        self.kv_scales = KVScaleCalibration(
            model, self.kv_cache_dtype == torch.float8_e4m3fn, config.calculate_kv_scales
        )
        self._dummy = False  # inside _dummy_step: profile and warm-up steps never calibrate
        # Pipeline stages run eagerly: their activations arrive by point-to-point transfers.
        # Decode graphs end with the LM head (their output is logits) on a single TP rank.
        self._graph_logits = self.parallel.tp.size == 1
        # A pooling runner's steps are prefills (a one-token prompt looks like a decode, whose graph
        # returns logits): no decode graphs; mixed steps' piecewise graphs return hidden states.
        self.pooling = config.runner == "pooling"
        if device.type == "cuda" and not config.enforce_eager and self.parallel.pp_size == 1:
            if not self.pooling:
                self.graphs = DecodeGraphs(decode_buckets(min(config.max_num_seqs, config.token_budget)))
            # Piecewise: the attention between pieces sees the step's metadata; a piece must not
            # hold collectives (tensor parallelism), which the decode graphs capture whole.
            buckets = mixed_buckets(config.mixed_graph_max_tokens, config.token_budget)
            if buckets and self.parallel.tp.size == 1:
                self.mixed_graphs = MixedGraphs(buckets)
        # LoRA (gpu_worker/lora): the model's shared token -> adapter slot map, each live
        # request's slot (adapter i of config.lora_modules is slot i + 1; absent: the base model).
        lora_slots = getattr(model, "lora_slots", None)
        self.lora_slots: LoraSlots | None = lora_slots if isinstance(lora_slots, LoraSlots) else None
        self._lora_slot_of = {name: i for i, (name, _) in enumerate(config.lora_adapters, start=1)}
        self._request_lora_slot: dict[str, int] = {}
        # A model that takes images (LLaVA): the live requests' images and their features.
        self.images: ImageFeatures | None = None
        if hasattr(model, "embed_images"):
            self.images = ImageFeatures(model, device, dtype, self.parallel.is_first_stage)
        # Set by _allocate (initialize_kv_cache, or a scratch pool during profile_run).
        self.num_kv_blocks = 0
        self.max_model_len = 0
        self.kv_caches: list[torch.Tensor] = []
        self._states: RequestStates | None = None
        self._inputs: StepInputBuffers | None = None

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        """This rank's KV caches: its stage's layers, its share of the KV heads."""
        spec: KVCacheSpec = self.model.kv_cache_spec  # type: ignore[assignment]
        return spec

    @property
    def states(self) -> RequestStates:
        """Per-request rows (block tables, token history, sampling settings)."""
        if self._states is None:
            raise RuntimeError("the runner has no KV pool yet: call initialize_kv_cache")
        return self._states

    @property
    def inputs(self) -> StepInputBuffers:
        """The step's preallocated input buffers."""
        if self._inputs is None:
            raise RuntimeError("the runner has no KV pool yet: call initialize_kv_cache")
        return self._inputs

    def initialize_kv_cache(self, num_kv_blocks: int, max_model_len: int) -> None:
        """Allocate the KV pool and the per-request state for ``max_model_len``-token sequences."""
        self._allocate(num_kv_blocks, max_model_len)

    def _allocate(self, num_kv_blocks: int, max_model_len: int) -> None:
        self._release()  # free the old ones first
        self.num_kv_blocks = num_kv_blocks
        self.max_model_len = max_model_len
        max_blocks_per_seq = -(-max_model_len // self.block_size)
        spec = self.kv_cache_spec
        shape = (2, num_kv_blocks, self.block_size, spec.num_kv_heads, spec.head_dim)
        self.kv_caches = [
            torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device) for _ in range(spec.num_layers)
        ]
        max_num_seqs = self.config.max_num_seqs
        self._states = RequestStates(
            max_num_seqs, max_blocks_per_seq, max_model_len, self.eos_token_ids, self.device
        )
        self._inputs = StepInputBuffers(
            self.config.token_budget, max_num_seqs, max_blocks_per_seq, self.block_size, self.device
        )

    @property
    def num_requests(self) -> int:
        """Requests whose state the runner holds."""
        return len(self.states)

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run one step and wait for its sampled ids."""
        return self.execute_async(sched).result()

    def execute_async(self, sched: SchedulerOutput) -> PendingRunnerOutput:
        """Launch one step: update state, forward the packed tokens, sample where asked.

        The returned output's ``result()`` must be taken before the step after next is
        launched (the engine core takes it right after launching the next one).
        """
        for req_id in sched.finished_req_ids | sched.preempted_req_ids:
            self.states.remove(req_id)
            self._request_lora_slot.pop(req_id, None)
            if self.images is not None:
                self.images.remove(req_id)
        self.last_step_reports = False
        if sched.is_empty:
            return PendingRunnerOutput.ready(_EMPTY_OUTPUT)
        columns = sched.step_columns()
        rows = self.states.update_batch(sched.requests, columns)
        prompt_plan = None
        if self.states.num_prompt_logprob_rows:
            prompt_plan = plan_prompt_logprobs(self.states, rows, columns)
        self.last_step_reports = prompt_plan is not None or any(columns.sample)
        bucket = None
        # Image positions take their features as input embeddings: such a step runs eagerly.
        image_pieces = self.images.plan(sched) if self.images is not None else []
        calibrate = self.kv_scales.pending and not self._dummy  # the first real step: eager
        eager = calibrate or bool(image_pieces)
        # A decode graph's output is logits of the sampled rows only: prompt positions need the
        # hidden states (a one-token prefill chunk makes a step look like decodes).
        if (self.graphs is not None and not eager and prompt_plan is None
                and sched.num_scheduled_tokens == len(sched.requests)):
            bucket = self.graphs.bucket_for(len(sched.requests))  # decode-only step
        mixed = None
        if bucket is None and self.mixed_graphs is not None and not eager:
            mixed = self.mixed_graphs.bucket_for(sched.num_scheduled_tokens)
        last = self._last_sample
        inputs = self.inputs.prepare(
            sched.requests, rows, self.states, pad_to=bucket,
            prev_sample_ids=None if last is None else last.req_ids, pad_tokens_to=mixed, columns=columns,
        )
        if self.lora_slots is not None:
            self._set_lora_slots(sched, inputs.num_tokens)
        if inputs.placeholder_dst is not None:
            assert last is not None and inputs.placeholder_src is not None  # checked by prepare
            with torch.inference_mode():
                if inputs.placeholders_in_order:  # a steady decode step: one copy, no gather
                    inputs.input_ids.copy_(last.token_ids)
                else:
                    inputs.input_ids.index_copy_(
                        0, inputs.placeholder_dst, last.token_ids.index_select(0, inputs.placeholder_src)
                    )
        embeds = None
        if image_pieces:  # after the placeholders are filled: the embeddings read the ids
            assert self.images is not None  # invariant: pieces come from it
            embeds = self.images.embeds(image_pieces, inputs.input_ids)
        if calibrate:
            with self.kv_scales.first_forward():
                hidden = self._forward_stage(inputs, embeds)
        elif mixed is not None:
            with torch.inference_mode():
                hidden = self.mixed_graphs.replay(  # type: ignore[union-attr]
                    mixed, inputs.num_tokens, inputs.attn_metadata)
        elif bucket is None:
            hidden = self._forward_stage(inputs, embeds)
        else:
            hidden = self.graphs.replay(bucket)  # type: ignore[union-attr]
        if hidden is None:  # the activations went to the next stage
            return PendingRunnerOutput.ready(_EMPTY_OUTPUT)
        if self.pooling:
            return self._pool(hidden, inputs)
        prompt = None
        if prompt_plan is not None:  # every TP rank: the LM head's gather is a collective
            prompt = compute_prompt_logprobs(self.model, hidden, prompt_plan, self.vocab_size)
        if not inputs.sample_req_ids:
            if prompt is None:
                return PendingRunnerOutput.ready(_EMPTY_OUTPUT)
            prompt_only = prompt
            return PendingRunnerOutput(lambda: replace(_EMPTY_OUTPUT, prompt_logprobs=prompt_only.result()))
        # A replayed decode graph ran the LM head too (one TP rank): ``hidden`` holds its logits.
        graphed_logits = bucket is not None and self._graph_logits
        pending = self._sample(hidden, inputs, sched.grammar, is_logits=graphed_logits)
        if prompt is None:
            return pending
        with_prompt = prompt
        return PendingRunnerOutput(lambda: replace(pending.result(), prompt_logprobs=with_prompt.result()))

    def load_lora(self, slot: int, name: str, path: str) -> None:
        """Read the adapter at ``path`` (checked against the model's sizes) into LoRA slot ``slot``
        of this rank's layers, serving it as ``name`` (runtime loading; the engine core picks a
        slot no request holds). ``ValueError`` naming the adapter and the problem."""
        from gpu_worker.lora.adapter import adapter_shapes_of, load_adapter
        from gpu_worker.lora.layers import write_slot

        if self.lora_slots is None:
            raise ValueError("this engine has no LoRA slots (lora_root or max_loras)")
        adapter = load_adapter(name, path, **adapter_shapes_of(self.hf_config),
                               max_rank=self.config.max_lora_rank)
        write_slot(self.model, adapter, slot, self.config.max_lora_rank)
        self._lora_slot_of[name] = slot

    def unload_lora(self, slot: int, name: str) -> None:
        """Empty LoRA slot ``slot`` (no request holds it any more) and forget ``name``."""
        from gpu_worker.lora.layers import write_slot

        write_slot(self.model, None, slot, self.config.max_lora_rank)
        if self._lora_slot_of.get(name) == slot:
            del self._lora_slot_of[name]

    def _set_lora_slots(self, sched: SchedulerOutput, num_tokens: int) -> None:
        """Write the step's token -> adapter slot map (tokens packed in the plan's order, as the
        step's inputs are; padding rows up to ``num_tokens`` run without an adapter)."""
        slot_of = self._request_lora_slot
        for r in sched.requests:
            if r.is_new:
                slot_of[r.req_id] = self._lora_slot_of.get(r.lora_name, 0)
        assert self.lora_slots is not None
        self.lora_slots.set([len(r.token_ids) for r in sched.requests],
                            [slot_of.get(r.req_id, 0) for r in sched.requests], num_tokens)

    @torch.inference_mode()
    def _forward_stage(self, inputs: StepInputs, embeds: torch.Tensor | None = None) -> torch.Tensor | None:
        """This rank's pipeline stage of the model: take the previous stage's activations (or the
        token ids, or ``embeds``: input embeddings with image features), run the stage's layers,
        and hand the result on (None) or return the hidden states (last stage)."""
        parallel = self.parallel
        if parallel.pp_size == 1:
            return self.forward(inputs.input_ids, inputs.positions, inputs.attn_metadata, embeds)
        intermediate = None
        if not parallel.is_first_stage:
            hidden_size = int(self.hf_config.hidden_size)
            intermediate = parallel.recv_from_prev_stage(
                inputs.num_tokens, hidden_size, self.dtype, self.device
            )
        if embeds is None:
            out = self.model(
                inputs.input_ids if parallel.is_first_stage else None, inputs.positions, inputs.attn_metadata,
                self.kv_caches, intermediate,
            )
        else:
            out = self.model(None, inputs.positions, inputs.attn_metadata, self.kv_caches, intermediate,
                             inputs_embeds=embeds)
        if isinstance(out, IntermediateTensors):
            parallel.send_to_next_stage(out)
            return None
        hidden: torch.Tensor = out
        return hidden

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata,
        embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The model call alone (the unit a CUDA graph would capture): ``[T]`` -> hidden ``[T, H]``
        (``embeds``: the ``[T, H]`` input embeddings of an image step, instead of the ids)."""
        if embeds is not None:
            out: torch.Tensor = self.model(None, positions, md, self.kv_caches, inputs_embeds=embeds)
            return out
        hidden: torch.Tensor = self.model(input_ids, positions, md, self.kv_caches)
        return hidden

    def _forward_padded_decode(self, size: int) -> torch.Tensor:
        """The model over the first ``size`` rows of the fixed buffers, one token per sequence.

        ``max_seq_len`` is ``max_model_len``: the decode kernel only sizes its grid with it,
        so one captured graph serves every context length.
        """
        ib = self.inputs
        md = AttentionMetadata(
            slot_mapping=ib.slot_mapping.device[:size],
            block_tables=ib.block_tables.device[:size],
            query_start_loc=ib.query_start_loc.device[: size + 1],
            seq_lens=ib.seq_lens.device[:size],
            max_query_len=1,
            max_seq_len=self.max_model_len,
        )
        return self.forward(ib.input_ids.device[:size], ib.positions.device[:size], md)

    @torch.inference_mode()
    def _decode_graph_body(self, size: int) -> torch.Tensor:
        """What a decode graph captures: :meth:`_forward_padded_decode` and, with one tensor
        parallel rank, the LM head over all ``size`` rows (``[size, vocab]`` logits), so that a
        graphed step launches neither the LM head nor the gather of its sampled rows (padding
        rows' logits are computed and never read). With several ranks the LM head's gather is
        a collective: it stays out of the graph, which then returns the hidden states."""
        hidden = self._forward_padded_decode(size)
        if not self._graph_logits:
            return hidden
        logits = self.model.compute_logits(hidden)  # type: ignore[operator]
        assert logits is not None  # one rank: it samples
        return logits

    def _forward_piecewise(self, size: int, capture: PiecewiseCapture) -> torch.Tensor:
        """The model over the first ``size`` token rows of the fixed buffers, its attention calls
        handed to ``capture`` (piece boundaries). Only ``slot_mapping`` is read by the pieces;
        the other fields are placeholders of the right kinds."""
        ib = self.inputs
        md = AttentionMetadata(
            slot_mapping=ib.slot_mapping.device[:size],
            block_tables=ib.block_tables.device[:1],
            query_start_loc=ib.query_start_loc.device[:2],
            seq_lens=ib.seq_lens.device[:1],
            max_query_len=size,
            max_seq_len=size,
            piecewise=capture,
        )
        return self.forward(ib.input_ids.device[:size], ib.positions.device[:size], md)

    def capture_mixed_graphs(self) -> int:
        """Capture the mixed steps' piecewise graphs (CUDA only, no-op otherwise); returns the
        bytes they took (their pool and the attention output buffers)."""
        mixed = self.mixed_graphs
        if mixed is None:
            return 0
        mixed.clear()
        return self._reserved_growth(partial(self.inputs.upload_token_padding, max(mixed.buckets)),
                                     partial(mixed.capture, self._forward_piecewise, self.device))

    def capture_decode_graphs(self) -> int:
        """Capture the decode graphs (CUDA only, no-op otherwise); returns the bytes their pool took."""
        graphs = self.graphs
        if graphs is None:
            return 0
        graphs.clear()
        return self._reserved_growth(partial(self.inputs.upload_decode_padding, max(graphs.buckets)),
                                     partial(graphs.capture, self._decode_graph_body, self.device))

    def _reserved_growth(self, pad: Callable[[], None], capture: Callable[[], None]) -> int:
        """The growth of reserved device memory while ``capture()`` captures graphs over the
        inert rows ``pad()`` uploads. Capturing empties the allocator's cache (torch.cuda.graph
        does): it is emptied first too, so the growth is the graphs' own memory."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(self.device)
        pad()
        capture()
        torch.cuda.empty_cache()
        return max(0, int(torch.cuda.memory_reserved(self.device) - before))

    @torch.inference_mode()
    def _sample(
        self, hidden: torch.Tensor, inputs: StepInputs, grammar: GrammarBitmask | None = None,
        is_logits: bool = False,
    ) -> PendingRunnerOutput:
        """Sample the step's sampled rows from ``hidden``: hidden states (the LM head runs here),
        or, with ``is_logits``, the logits of every padded row a decode graph computed."""
        if not is_logits:
            logits = self.model.compute_logits(hidden.index_select(0, inputs.logits_indices))  # type: ignore[operator]
        elif len(inputs.sample_req_ids) == inputs.num_tokens:  # a decode step sampling every row
            logits = hidden[: inputs.num_tokens]  # its logits rows are 0 .. n - 1
        else:
            logits = hidden.index_select(0, inputs.logits_indices)
        tp = self.parallel.tp
        if logits is None:  # another TP rank samples: take its ids (placeholders of later steps)
            ids = torch.empty(len(inputs.sample_req_ids), dtype=torch.int64, device=self.device)
            self._last_sample = _LastSample(inputs.sample_req_ids, tp.broadcast_from_first(ids))
            return PendingRunnerOutput.ready(_EMPTY_OUTPUT)
        if self._pending is not None and self.states.needs_history[inputs.sample_rows].any():
            self._pending.result()  # penalties and plug-ins see the previous step's tokens too
        if inputs.num_draft_tokens is not None:  # speculative decoding (gpu_worker/spec_decode/)
            final_ids, finalize = verify_drafts(
                logits, inputs, self.states, self.logits_processing, self.sampler.generator, grammar
            )
            tp.broadcast_from_first(final_ids)
            self._last_sample = _LastSample(inputs.sample_req_ids, final_ids)
            self._pending = PendingRunnerOutput(finalize)
            return self._pending
        if grammar is None and self.states.plain_greedy[inputs.sample_rows].all():
            # What ``sample`` does for a plain greedy step, without gathering the metadata that
            # would say so (W1/W3's every step).
            out = self.sampler.greedy(logits)
        else:
            md = build_sampling_metadata(self.states, inputs.sample_rows, self.vocab_size, self.device)
            md = self.logits_processing.attach(md, self.states, inputs.sample_rows, inputs.sample_req_ids,
                                               grammar)
            out = self.sampler.sample(logits, md)
        tp.broadcast_from_first(out.token_ids)
        self._last_sample = _LastSample(inputs.sample_req_ids, out.token_ids)
        self._pending = self._pending_output(out, inputs)
        return self._pending

    @torch.inference_mode()
    def _pool(self, hidden: torch.Tensor, inputs: StepInputs) -> PendingRunnerOutput:
        """A pooling runner's step: each finished prompt's last hidden state, L2-normalized (the
        last-token pooler of decoder embedding models), in float32; its token is 0 (the request
        ends with it: ``max_tokens`` 1)."""
        req_ids = inputs.sample_req_ids
        if not req_ids:  # prefill chunks that end no prompt
            return PendingRunnerOutput.ready(_EMPTY_OUTPUT)
        placeholders = torch.zeros(len(req_ids), dtype=torch.int64, device=self.device)
        self._last_sample = _LastSample(req_ids, placeholders)
        if not self.parallel.samples:
            return PendingRunnerOutput.ready(_EMPTY_OUTPUT)
        vectors = torch.nn.functional.normalize(hidden.index_select(0, inputs.logits_indices).float(), dim=-1)
        host = vectors.to("cpu", non_blocking=True)
        copied = None
        if self.device.type == "cuda":
            copied = torch.cuda.Event()
            copied.record()

        def finalize() -> RunnerOutput:
            if copied is not None:
                copied.synchronize()
            pooled = tuple(tuple(row) for row in host.tolist())
            return RunnerOutput(req_ids=req_ids, sampled_token_ids=(0,) * len(req_ids), pooled=pooled)

        return PendingRunnerOutput(finalize)

    def _pending_output(self, out: SamplerOutput, inputs: StepInputs) -> PendingRunnerOutput:
        """Start the copies of the sampled ids (and logprobs) to the host; the returned
        output waits for them alone and records the tokens in the request state."""
        ids_host = out.token_ids.to("cpu", non_blocking=True)  # pinned on CUDA: truly async
        logprobs_host = out.logprobs.to_host() if out.logprobs is not None else None
        copied = None
        if self.device.type == "cuda":
            copied = torch.cuda.Event()
            copied.record()
        req_ids, rows, positions = inputs.sample_req_ids, inputs.sample_rows, inputs.sample_positions
        states, removals = self.states, self.states.num_removals

        def finalize() -> RunnerOutput:
            if copied is not None:
                copied.synchronize()  # the step's one wait for the device
            token_ids: list[int] = ids_host.tolist()
            # Later steps may have been planned meanwhile: skip rows that changed hands (none can
            # have while no row was given up since this step's launch).
            owners = req_ids if states.num_removals != removals else None
            states.record_sampled(rows, positions, token_ids, owners)
            logprobs = logprobs_host.to_list(token_ids) if logprobs_host is not None else ()
            return RunnerOutput(req_ids=req_ids, sampled_token_ids=tuple(token_ids), logprobs=logprobs)

        return PendingRunnerOutput(finalize)

    def profile_run(self, max_seq_len: int) -> int:
        """Run a maximum-size dummy step (max_num_batched_tokens over max_num_seqs sequences of
        at most ``max_seq_len`` tokens) on a scratch one-block pool, before the real pool exists.

        Returns the peak device memory in bytes on CUDA (0 elsewhere), weights included, plus,
        when decode graphs are enabled, the memory pool that capturing them takes (graphs are
        captured and dropped again). Leaves no KV pool and no request state behind.
        """
        self._allocate(1, max_seq_len)
        num_tokens = self.config.token_budget
        num_seqs = max(1, min(self.config.max_num_seqs, num_tokens))
        try:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            self._dummy_step(num_tokens, num_seqs)
            if self.device.type != "cuda":
                return 0
            torch.cuda.synchronize(self.device)
            peak = int(torch.cuda.max_memory_allocated(self.device))
            graph_bytes = self.capture_decode_graphs() + self.capture_mixed_graphs()
            if self.graphs is not None:
                self.graphs.clear()
            if self.mixed_graphs is not None:
                self.mixed_graphs.clear()
            return peak + graph_bytes
        finally:
            self._release()

    def _release(self) -> None:
        self.kv_caches, self._states, self._inputs = [], None, None
        self._last_sample = self._pending = None
        self.num_kv_blocks = self.max_model_len = 0
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def warmup(self) -> None:
        """Run a small prefill and a decode-sized step so lazy initialization happens before
        serving, then capture the decode and the mixed steps' CUDA graphs (on CUDA, unless
        ``enforce_eager``)."""
        budget = self.config.token_budget
        small = min(budget, 2 * self.block_size)
        self._dummy_step(small, 1)
        if self.device.type == "cuda" and small > 1:
            # A step whose token count is not a multiple of 16: Triton specializes integer
            # arguments on divisibility by 16, and every other warm-up step's count is one, so
            # the first real step of another size compiled new variants inside a request
            # (the prefill kernel with an fp8 cache: a 612 ms step in W1 on an H200).
            self._dummy_step(small - 1, 1)
        if self.kv_scales.pending:  # compile the first real step's calibrating path now
            with self.kv_scales.rehearsal():
                self._dummy_step(small, 1)
        self._dummy_step(min(self.config.max_num_seqs, budget), min(self.config.max_num_seqs, budget))
        if self.device.type == "cuda":  # the dummy steps sample; compile the greedy argmax here too
            self.sampler.greedy(torch.zeros(1, self.vocab_size, dtype=self.dtype, device=self.device))
        self.capture_decode_graphs()
        self.capture_mixed_graphs()

    def _dummy_step(self, num_tokens: int, num_seqs: int) -> None:
        """A throwaway step on scratch KV slots (block 0 repeated); state is dropped afterwards."""
        per_seq = [num_tokens // num_seqs + (1 if i < num_tokens % num_seqs else 0) for i in range(num_seqs)]
        params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=1)
        requests = []
        for i, n in enumerate(per_seq):
            n = max(1, min(n, self.max_model_len))
            blocks = (0,) * (-(-n // self.block_size))  # every token writes into block 0: content is junk
            requests.append(
                ScheduledRequest(
                    req_id=f"__dummy_{i}",
                    token_ids=(0,) * n,
                    start_pos=0,
                    block_ids=blocks,
                    sample=True,
                    is_new=True,
                    params=params,
                    prompt_len=n,
                )
            )
        ids = frozenset(r.req_id for r in requests)
        self._dummy = True
        try:
            self.execute(SchedulerOutput(requests=tuple(requests), num_scheduled_tokens=sum(per_seq)))
            self.execute(SchedulerOutput(requests=(), num_scheduled_tokens=0, finished_req_ids=ids))
        finally:
            self._dummy = False
