"""4-bit (and 8-bit) integer weights with 16-bit activations: :class:`WnA16LinearMethod`.

One method for every WnA16 source (the layout: :class:`kernels.quant_reference.WnA16Weight`,
DECISIONS 35): GPTQ checkpoints, GGUF files served quantized, and random packed weights for
benchmarks. A layer collects one *part* per fused sub-matrix (q, k, v; gate, up) as the
checkpoint loads, each already cut to this rank's shard and moved to the device;
:meth:`WnA16LinearMethod.process_weights_after_loading` joins consecutive parts of one format
into a *segment* (``concat_rows``: exact), so a layer whose parts agree (GPTQ, SmolLM2's Q4_1)
runs one ``ops.wna16_linear``; a GGUF that mixes types inside a fused layer (Q4_K_M's Q6_K
``attn_v`` next to Q4_K ``attn_q``) runs one call per segment and concatenates. Tensors of a
type with no exact WnA16 form (IQ*, ...) or stored dense (F16, F32) become dense 16-bit
segments (``F.linear``).

Tensor parallelism: a column-parallel layer takes output rows (GPTQ: columns of ``qweight``,
``scales`` and, 8 per word, ``qzeros``); a row-parallel layer takes input columns at whole group
boundaries (GPTQ: rows of ``qweight``, groups of ``scales``/``qzeros``/``g_idx``); both exact.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn

from gpu_worker.model_executor.layers.quantization.awq_format import AwqConfig, awq_slice, convert_awq
from gpu_worker.model_executor.layers.quantization.base import LinearMethod, WeightShard
from gpu_worker.model_executor.layers.quantization.ct_int_format import NAMES as _CT_NAMES
from gpu_worker.model_executor.layers.quantization.ct_int_format import CtIntConfig, convert_ct_int, ct_slice
from gpu_worker.model_executor.layers.quantization.gptq_format import (
    GptqConfig,
    act_order,
    convert_gptq,
    groups_in_order,
    narrow_groups,
    permute_inputs,
    shard_g_idx,
)
from gpu_worker.model_executor.weights import TensorSource
from kernels import KernelOps
from kernels.quant_reference import WnA16Weight, concat_rows
from kernels.rope_store import RopeStore

_GPTQ_NAMES = frozenset({"qweight", "qzeros", "scales", "g_idx"})
# Random 4-bit weights: (q - 8) is uniform on -8..7, whose standard deviation is this.
_NIBBLE_STD = (255 / 12) ** 0.5

Part = WnA16Weight | torch.Tensor  # a packed weight, or a dense [rows, K] one


def reorder_inputs(ops: KernelOps, x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x.index_select(-1, perm)``: through ``ops.gather_columns`` where the op set has it (on
    CUDA a kernel in the decode step's PDL chain), else torch's."""
    if ops.gather_columns is not None:
        out: torch.Tensor = ops.gather_columns(x, perm)
        return out
    return x.index_select(-1, perm)


@dataclass(frozen=True)
class Segment:
    """Consecutive output rows of one layer in one format; ``counters``: the one-token GEMV's
    split-K arrival counts for this weight (``KernelOps.wna16_split_counters``), if it takes any;
    ``perm``: the order of the inputs the weight's columns are in (an act-order GPTQ weight,
    ``gptq_format.act_order``; None: the layer's own order)."""

    weight: WnA16Weight | None
    dense: torch.Tensor | None
    counters: torch.Tensor | None = None
    perm: torch.Tensor | None = None

    def __call__(self, ops: KernelOps, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.perm is not None:
            x = reorder_inputs(ops, x, self.perm)
        if self.weight is None:
            assert self.dense is not None  # invariant: one of the two is set
            if ops.linear16 is not None and x.numel() == x.shape[-1]:  # one token: as a 16-bit layer
                dense: torch.Tensor = ops.linear16(x, self.dense, bias)
                return dense
            return nn.functional.linear(x, self.dense, bias)
        w = self.weight
        # Counts go only to a set that takes them (a layer's ops may be swapped after loading).
        takes = self.counters is not None and ops.wna16_split_counters is not None
        extra = {"counters": self.counters} if takes else {}
        out: torch.Tensor = ops.wna16_linear(x, w.qweight, w.scales, w.offsets, w.bits, w.group_size, bias,
                                             **extra)
        return out

    def with_counters(self, ops: KernelOps) -> Segment:
        """This segment with the counts its one-token GEMV takes on ``ops`` (none for dense rows
        or sets without split counts)."""
        if self.weight is None or ops.wna16_split_counters is None:
            return self
        w = self.weight
        counters = ops.wna16_split_counters(w.out_features, w.in_features, w.qweight.device)
        return self if counters is None else replace(self, counters=counters)


class LayerState:
    """A 4-bit layer's weights: parts while loading, segments after."""

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype) -> None:
        self.shape = (out_features, in_features)
        self.dtype = dtype  # of dense segments (the activations')
        self.parts: dict[int, Part] = {}  # fused sub-matrix -> its converted shard
        self.perms: dict[int, torch.Tensor] = {}  # fused sub-matrix -> its act-order input order
        self.staged: dict[int, dict[str, torch.Tensor]] = {}  # GPTQ tensors waiting for the rest
        self.segments: tuple[Segment, ...] = ()


def layer_state(layer: nn.Module) -> LayerState:
    state: LayerState = layer.__dict__["wna16"]
    return state


class WnA16LinearMethod(LinearMethod):
    """Grouped integer weights dequantized in the kernel (``ops.wna16_linear``).

    ``device``: where the layers live; ``gptq`` / ``awq`` / ``ct``: the checkpoint's GPTQ, AWQ or
    compressed-tensors (``pack-quantized``) configuration (none: GGUF tensors, or random weights)."""

    def __init__(
        self,
        ops: KernelOps,
        device: torch.device,
        gptq: GptqConfig | None = None,
        random_group_size: int = 128,
        awq: AwqConfig | None = None,
        ct: CtIntConfig | None = None,
    ) -> None:
        self.ops = ops
        self.device = device
        self.gptq = gptq
        self.awq = awq
        self.ct = ct
        self.random_group_size = random_group_size

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        # The parameters' shapes depend on what the checkpoint holds (GGUF types vary per
        # tensor): parts are collected by load_weight, segments built after loading.
        layer.__dict__["wna16"] = LayerState(out_features, in_features, dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        segments = layer_state(layer).segments
        if len(segments) == 1:
            return segments[0](self.ops, x, bias)
        y = torch.cat([s(self.ops, x, None) for s in segments], dim=-1)
        return y if bias is None else y + bias

    def apply_gated(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        segments = layer_state(layer).segments
        w = segments[0].weight if len(segments) == 1 else None
        if self.ops.wna16_gated_linear is None or w is None:
            return None  # gate and up in different formats (a mixed GGUF) or input orders
        if segments[0].perm is not None:
            x = reorder_inputs(self.ops, x, segments[0].perm)
        y: torch.Tensor = self.ops.wna16_gated_linear(x, w.qweight, w.scales, w.offsets, w.bits, w.group_size,
                                                      bias)
        return y

    def apply_rope(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, rope: RopeStore
    ) -> torch.Tensor | None:
        segments = layer_state(layer).segments
        w = segments[0].weight if len(segments) == 1 else None
        if self.ops.wna16_rope_linear is None or w is None or segments[0].counters is not None:
            return None  # q, k and v in different formats, or a split tiling (its own counts)
        if segments[0].perm is not None:
            x = reorder_inputs(self.ops, x, segments[0].perm)
        q: torch.Tensor | None = self.ops.wna16_rope_linear(x, w.qweight, w.scales, w.offsets, w.bits,
                                                            w.group_size, bias, rope)
        return q

    def checkpoint_names(self) -> frozenset[str]:
        return _GPTQ_NAMES | _CT_NAMES | {"weight"}

    # ------------------------------------------------------------------ loading

    def load_weight(
        self, layer: nn.Module, name: str, source: TensorSource, shard: WeightShard
    ) -> Iterable[str]:
        state = layer_state(layer)
        if name == "weight":
            state.parts[shard.index] = self._weight_part(state, source, shard).to(self.device)
            return ()
        if self.awq is not None and name in _GPTQ_NAMES:
            return self._load_awq(state, name, source, shard, self.awq)
        if self.ct is not None and name in _CT_NAMES:
            return self._load_ct(state, name, source, shard, self.ct)
        if name not in _GPTQ_NAMES or self.gptq is None:
            raise ValueError(f"4-bit linear layers load weight or GPTQ tensors, not {name!r}")
        piece = _gptq_slice(name, source, shard, self.gptq)
        if shard.index in state.parts:  # converted already: only a late g_idx comes here
            if name == "g_idx":
                _check_late_g_idx(piece, self.gptq.group_size, "GPTQ", "says desc_act: false")
            return ()
        staged = state.staged.setdefault(shard.index, {})
        staged[name] = piece
        # An act-order layer converts once its g_idx is here too (its inputs are reordered).
        needed = {"qweight", "qzeros", "scales"} | ({"g_idx"} if self.gptq.desc_act else set())
        if needed <= staged.keys():
            config = self.gptq
            if shard.dim == 1 and staged["scales"].shape[0] == 1:  # one group: it spans the shard
                config = replace(self.gptq, group_size=-1)
            g_idx = staged.get("g_idx")
            perm = None if g_idx is None else act_order(g_idx, config.group_size)
            qweight = staged["qweight"]
            if perm is not None:
                qweight, g_idx = permute_inputs(qweight, perm, config.bits), None
            self._store_part(state, shard, convert_gptq(qweight, staged["qzeros"], staged["scales"], g_idx,
                                                        config), perm)
        return ()

    def _load_awq(self, state: LayerState, name: str, source: TensorSource, shard: WeightShard,
                  config: AwqConfig) -> Iterable[str]:
        """Stage this rank's part of an AWQ tensor; convert the layer part once all three are in."""
        if name == "g_idx":
            raise ValueError("AWQ checkpoints have no g_idx")
        staged = state.staged.setdefault(shard.index, {})
        staged[name] = awq_slice(name, source, shard.start, shard.length, shard.dim, config.group_size)
        if {"qweight", "qzeros", "scales"} <= staged.keys():
            group = config.group_size
            if shard.dim == 1 and staged["scales"].shape[0] == 1:  # one group: it spans the shard
                group = staged["qweight"].shape[0]
            self._store_part(state, shard, convert_awq(staged["qweight"], staged["qzeros"], staged["scales"],
                                                       group))
        return ()

    def _load_ct(self, state: LayerState, name: str, source: TensorSource, shard: WeightShard,
                 config: CtIntConfig) -> Iterable[str]:
        """Stage this rank's part of a compressed-tensors tensor; convert the layer part once
        the tensors its scheme needs are in (ct_int_format's module docstring)."""
        if name == "weight_shape":
            return ()  # the shapes follow from weight_packed and the layer
        piece = ct_slice(name, source, shard.start, shard.length, shard.dim, config)
        if shard.index in state.parts:  # converted already: only a g_idx the scheme did not need
            if name == "weight_g_idx":
                _check_late_g_idx(piece, config.group_size, "compressed-tensors", "has no actorder 'group'")
            return ()
        staged = state.staged.setdefault(shard.index, {})
        staged[name] = piece
        needed = {"weight_packed", "weight_scale"} | (set() if config.symmetric else {"weight_zero_point"})
        if config.actorder == "group":
            needed.add("weight_g_idx")
        if needed <= staged.keys():
            packed, scales = staged["weight_packed"], staged["weight_scale"]
            group = config.group_size
            if group == -1 or scales.shape[1] == 1:  # one group: it spans the shard
                group = packed.shape[1] * config.pack
            g_idx = staged.get("weight_g_idx")
            perm = None if g_idx is None else act_order(g_idx, group)
            self._store_part(state, shard, convert_ct_int(packed, scales, staged.get("weight_zero_point"),
                                                          config, perm=perm), perm)
        return ()

    def _store_part(self, state: LayerState, shard: WeightShard, part: WnA16Weight,
                    perm: torch.Tensor | None = None) -> None:
        """A converted checkpoint part (and its act-order input order) on the device, its staged
        tensors dropped."""
        del state.staged[shard.index]
        state.parts[shard.index] = part.to(self.device)
        if perm is not None:
            state.perms[shard.index] = perm.to(self.device)

    def _weight_part(self, state: LayerState, source: TensorSource, shard: WeightShard) -> Part:
        """A GGUF tensor repacked (when its type has an exact WnA16 form), else dense."""
        wna16 = getattr(source, "wna16", None)
        packed: WnA16Weight | None = wna16() if callable(wna16) else None
        if packed is None:
            return shard.read(source).to(state.dtype)
        if shard.dim == 0:
            return packed.select_rows(torch.arange(shard.start, shard.start + shard.length))
        return packed.select_inputs(shard.start, shard.length)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        state = layer_state(layer)
        if state.segments:  # random weights: built already
            return
        expected = len(getattr(layer, "local_sizes", [0]))
        if sorted(state.parts) != list(range(expected)) or state.staged:
            raise ValueError(f"4-bit layer of shape {state.shape}: checkpoint parts {sorted(state.parts)} "
                             f"of {expected} (a GPTQ tensor or a GGUF projection is missing)")
        segments = join_parts([state.parts[i] for i in range(expected)],
                              [state.perms.get(i) for i in range(expected)])
        _set_segments(layer, [s.with_counters(self.ops) for s in segments])
        state.parts, state.staged, state.perms = {}, {}, {}

    def fill_random(self, layer: nn.Module, seed: int, std: float) -> bool:
        """Symmetric 4-bit weights (every nibble uniform), one scale per group of
        ``random_group_size`` (or the largest power of two dividing K), standard deviation ``std``."""
        n, k = layer_state(layer).shape
        group = self.random_group_size
        while k % group and group > 16:
            group //= 2
        device = self.device
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        qweight = torch.randint(0, 256, (n, k // 2), generator=generator, device=device, dtype=torch.uint8)
        scales = torch.full((n, k // group), std / _NIBBLE_STD, dtype=torch.float16, device=device)
        segment = Segment(WnA16Weight(qweight, scales, None, 4, group), None)
        _set_segments(layer, [segment.with_counters(self.ops)])
        return True


def fold_input_order(producer: nn.Module, consumer: nn.Module, halves: int = 2) -> bool:
    """Move an act-order ``consumer``'s input reordering into ``producer``'s output rows, where
    the consumer's input is the producer's output (``halves`` of it combined elementwise: the
    MLP's ``silu(gate) * up`` feeding ``down_proj``). Reordering each half's rows by the
    consumer's ``perm`` makes the product arrive already in the consumer's order: exact (rows are
    independent), and one ``index_select`` fewer per step. Only where both are 4-bit layers of
    one segment each (one rank: act-order refuses row-parallel shards); True when folded."""
    if not (isinstance(producer.linear_method, WnA16LinearMethod)
            and isinstance(consumer.linear_method, WnA16LinearMethod)):
        return False
    made, used = layer_state(producer).segments, layer_state(consumer).segments
    if len(made) != 1 or len(used) != 1 or used[0].perm is None or made[0].weight is None:
        return False
    perm = used[0].perm
    rows = made[0].weight.out_features // halves
    if rows != perm.shape[0]:
        return False
    index = torch.cat([perm + h * rows for h in range(halves)])
    _set_segments(producer, [replace(made[0], weight=made[0].weight.select_rows(index))])
    _set_segments(consumer, [replace(used[0], perm=None)])
    return True


def _set_segments(layer: nn.Module, segments: list[Segment]) -> None:
    state = layer_state(layer)
    rows = sum(_rows_of(s) for s in segments)
    if rows != state.shape[0]:
        raise ValueError(f"4-bit layer holds {rows} output rows, expected {state.shape[0]}")
    # Registered as (frozen) parameters: weight accounting and state_dict() see them.
    for i, s in enumerate(segments):
        tensors = {"dense": s.dense} if s.weight is None else {
            "qweight": s.weight.qweight, "scales": s.weight.scales, "offsets": s.weight.offsets}
        for key, t in tensors.items():
            if t is not None:
                layer.register_parameter(f"segment{i}_{key}", nn.Parameter(t, requires_grad=False))
    state.segments = tuple(segments)


def _rows_of(s: Segment) -> int:
    return s.weight.out_features if s.weight is not None else int(s.dense.shape[0])  # type: ignore[union-attr]


def _check_late_g_idx(g_idx: torch.Tensor, group_size: int, fmt: str, config_says: str) -> None:
    """A g_idx that came after its layer converted (its config did not ask for act-order) must
    be the plain ``k // group_size``."""
    if not groups_in_order(g_idx, group_size):
        raise ValueError(f"{fmt}: an act-order g_idx (not k // group_size) came after its layer's other "
                         f"tensors in a checkpoint whose config {config_says}")


def _gptq_slice(name: str, source: TensorSource, shard: WeightShard, config: GptqConfig) -> torch.Tensor:
    """This rank's part of one GPTQ tensor (module docstring)."""
    pack = 32 // config.bits  # values per int32 word
    start, length = shard.start, shard.length
    if shard.dim == 0:  # output columns of the GPTQ tensors
        if name == "g_idx":
            return source.full()  # every input: an act-order layer's order stays whole
        if name == "qzeros":
            if start % pack or length % pack:
                raise ValueError(f"GPTQ qzeros pack {pack} outputs per word: cannot cut at {start}+{length}")
            return source.narrow(1, start // pack, length // pack)
        return source.narrow(1, start, length)
    # Input rows: whole words of qweight, whole groups of scales / qzeros / g_idx.
    if name == "qweight":
        return source.narrow(0, start // pack, length // pack)
    if name == "g_idx":
        return shard_g_idx(source, start, length, config.group_size,
                           "GPTQ act-order (desc_act) weights cannot be split by inputs: the "
                           "o_proj/down_proj shards of tensor_parallel_size > 1 would hold parts of "
                           "every group; serve this checkpoint with tensor_parallel_size=1")
    return narrow_groups(source, 0, start, length, config.group_size, "GPTQ")


def _with_offsets(w: WnA16Weight) -> WnA16Weight:
    """The same weight stored unsigned with explicit offsets (exact for float16 scales)."""
    if w.offsets is not None:
        return w
    half = 8 if w.bits == 4 else 128
    qweight = w.qweight if w.bits == 4 else (w.qweight.to(torch.int16) + half).to(torch.uint8)
    offsets = -(w.scales.float() * half)
    return WnA16Weight(qweight, w.scales, offsets, w.bits, w.group_size)


def join_parts(parts: list[Part], perms: list[torch.Tensor | None] | None = None) -> list[Segment]:
    """Consecutive parts of one format and one input order (``perms``, per part; None: all in
    the layer's own order) joined into segments (module docstring)."""
    orders = perms if perms is not None else [None] * len(parts)
    segments: list[Segment] = []
    run: list[Part] = []
    run_perm: torch.Tensor | None = None

    def flush() -> None:
        if not run:
            return
        if isinstance(run[0], torch.Tensor):
            segments.append(Segment(None, torch.cat(run), perm=run_perm))  # type: ignore[arg-type]
        else:
            packed: list[WnA16Weight] = run  # type: ignore[assignment]
            if len({w.offsets is None for w in packed}) > 1:
                packed = [_with_offsets(w) for w in packed]
            weight = packed[0] if len(packed) == 1 else concat_rows(packed)
            segments.append(Segment(weight, None, perm=run_perm))
        run.clear()

    for part, perm in zip(parts, orders, strict=True):
        if run and not (_same_format(run[-1], part) and _same_order(run_perm, perm)):
            flush()
        if not run:
            run_perm = perm
        run.append(part)
    flush()
    return segments


def _same_order(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(torch.equal(a, b))


def _same_format(a: Part, b: Part) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    return a.bits == b.bits and a.group_size == b.group_size
