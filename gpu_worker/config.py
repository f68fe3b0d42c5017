"""Engine configuration: one frozen dataclass, validated on construction.

Flags are parsed only in ``__main__``/CLI code, which builds an :class:`EngineConfig`;
``LLM(model=..., **engine_args)`` takes the same field names as keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from gpu_worker.core.scheduling_policy import BUILTIN_POLICIES
from gpu_worker.spec_decode.config import SpeculativeConfig
from kernels import FP8_WEIGHT_ONLY_MAX_M_LIMIT

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_LOAD_FORMATS = ("auto", "dummy")
# Weight quantization (docs/QUANTIZATION.md; resolved by layers/quantization/select.py) and the
# KV pool's element type.
QUANTIZATIONS = ("auto", "none", "fp8", "gptq", "awq", "compressed-tensors", "gguf")
KV_CACHE_DTYPES = ("auto", "fp8")
AUTO_TENSOR_PARALLEL = 0  # tensor_parallel_size "auto": chosen from the model and the GPUs
# Per-step token budgets when max_num_batched_tokens is left unset (see EngineConfig).
CUDA_MAX_NUM_BATCHED_TOKENS = 8192
# The offline engine (gpu_worker.LLM) on a large card (loader.is_large_gpu: H100 / H200 class),
# as vLLM's LLM class there: nobody streams from its steps (docs/DECISIONS.md 130).
OFFLINE_LARGE_GPU_MAX_NUM_BATCHED_TOKENS = 16384
CPU_MAX_NUM_BATCHED_TOKENS = 2048


# "generate": text; "pooling": one embedding per prompt (the last token's normalized hidden state,
# vLLM's ``--runner pooling`` with its default pooler for decoder embedding models such as
# Qwen3-Embedding): each request is a prefill that ends after it.
RUNNERS = ("generate", "pooling")
MAX_LORA_ADAPTERS = 64  # adapters one engine serves (all resident: each is a slot of every LoRA layer)
MAX_LORA_RANK_LIMIT = 256


def lora_modules_value(value: str | list[str] | None) -> str | None:
    """``--lora-modules`` as ``EngineConfig.lora_modules``: the flag's items (vLLM's form,
    ``a=/p b=/q``) joined by commas; the variable's one string as it is."""
    return ",".join(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes one engine instance.

    ``model`` is an HF model folder, a ``.gguf`` file, or an alias (``smollm2-135m``).
    With ``load_format="dummy"`` it may also name a config (folder with config.json) whose
    weights are drawn at random (benchmarks on real shapes). ``dtype="auto"`` means
    float32 on CPU and bfloat16 on CUDA. The KV pool is sized, in order of precedence,
    from ``num_kv_blocks``, from ``kv_cache_memory_bytes``, or (CUDA only) from
    ``gpu_memory_utilization`` after profiling a maximum-size step.

    ``skip_tokenizer_init`` serves the model without a tokenizer (vLLM's flag of that name):
    prompts must be token ids, outputs carry token ids with empty text, stop strings are
    refused and EOS comes from the model's config. It is also implied when
    ``load_format="dummy"`` and the model folder has no tokenizer files (benchmark shapes).

    ``engine_core_process`` runs the serving engine core (``AsyncLLM``) in a child process
    instead of a thread, so its step loop never competes with the gRPC event loop for the GIL
    (vLLM v1's ``EngineCoreProc``); ``None`` (auto) means a process on CUDA, a thread on CPU
    (W4 on an H200: gRPC cost 30% -> 15% vs offline). The offline ``LLM`` ignores it.

    ``async_scheduling`` plans and launches step k+1 before waiting for step k's sampled
    tokens (vLLM's ``--async-scheduling``), hiding the host's work behind the device's;
    ``None`` (auto) means on with CUDA, off on CPU (where there is nothing to overlap).
    Outputs are the same token for token either way.

    The serving front (``AsyncLLM``) admits a request only while the waiting queue has room for
    all its sequences (``n`` of them): at most ``max_queue_len`` sequences and
    ``max_queued_tokens`` tokens wait for their first admission; beyond, RESOURCE_EXHAUSTED.

    ``tensor_parallel_size`` x ``pipeline_parallel_size`` ranks serve the model, one per device
    (GPUs ``0 .. N-1`` of the visible ones; on the CPU, processes joined by gloo): each rank holds
    its shard, the engine core stays one (docs/PARALLELISM.md). ``distributed_port`` is the
    ranks' rendezvous port (default: a free one). ``tensor_parallel_size=0`` (``"auto"`` in
    ``LLM(...)`` and on the command line) picks the fewest GPUs that hold the weights and a useful
    KV pool (``gpu_worker/distributed/auto_size.py``), TP first, then PP.

    ``scheduling_policy`` orders the waiting queue and picks who is preempted: ``fcfs`` (arrival
    order, the default), ``priority`` (the request's ``priority``, lower first, as vLLM's
    ``--scheduling-policy priority``) or a policy from an installed package (docs/PLUGINS.md).

    ``runner``: ``"generate"`` (text) or ``"pooling"`` (:data:`RUNNERS`: each request is one
    prefill whose result is an embedding, ``RequestOutput.embedding``; vLLM's ``--runner``).

    ``speculative_config`` turns on speculative decoding (docs/SPEC_DECODE.md; vLLM's shape, a
    :class:`~gpu_worker.spec_decode.config.SpeculativeConfig` or its dict, e.g.
    ``{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}`` or
    ``{"method": "draft_model", "model": ..., "num_speculative_tokens": 4}``). Greedy outputs are
    unchanged, token for token; sampled ones keep their distribution. Async scheduling then
    defaults to off.

    ``quantization`` picks the weights' format (docs/QUANTIZATION.md): ``auto`` serves what the
    checkpoint is (fp8, GPTQ, AWQ or compressed-tensors when its ``quantization_config`` says so; a
    ``.gguf`` quantized on
    CUDA and through its dequantized cache on the CPU), ``none`` 16/32-bit weights, ``fp8`` e4m3
    weights (a 16/32-bit checkpoint quantized as it loads), ``gptq`` a GPTQ checkpoint (or random
    4-bit weights with ``load_format="dummy"``), ``awq`` an AWQ checkpoint, ``compressed-tensors``
    a compressed-tensors checkpoint (integer W4A16 / W8A16 in the 4-bit layers, fp8 as ``fp8``),
    ``gguf`` a ``.gguf`` served quantized.
    ``kv_cache_dtype`` ``fp8`` stores K/V as e4m3 (about twice the tokens in the same memory;
    scales from the checkpoint, else computed from the first real prefill, per layer, with
    ``calculate_kv_scales`` (the default; off: 1.0)), ``auto`` in the model's dtype. Once the
    engine has loaded, its effective config holds the resolved quantization, never ``auto``.
    ``fp8_weight_only_max_tokens``: with fp8 weights, steps of at most this many tokens skip the
    activation's quantization and read fp8 weights against the 16-bit activation (W8A16; None:
    the kernels' default, 1, i.e. batch-1 decode; 0: always W8A8; at most 16).
    ``enable_pdl``: on sm_90+ GPUs (Hopper and later) the decode step's Triton kernels launch with
    programmatic dependent launch, each one's start (its first weight tile) overlapping the end of
    the kernel before (kernels/triton_ops/pdl.py; the same outputs, bit for bit); False launches
    them one after another, as before sm_90.

    Left unset, ``max_num_batched_tokens`` (the per-step token budget, i.e. the chunked-prefill
    chunk) is chosen by device and use (:meth:`with_device_defaults`, docs/CONFIG.md): 8192 on
    CUDA, where larger steps keep the GPU's matrix units busy (W1 on an H200: 9,003 tok/s at
    2048 vs 10,467 at 8192, W3 31,116 vs ~44,500); 16384 for the offline engine on a large card
    (H100 / H200 class), where no stream waits on a step (W3 on an H200: fewer, larger prompt
    steps and a shorter tail); and 2048 on the CPU, where a step's time grows with its tokens
    and a smaller chunk keeps decodes of other requests flowing.

    ``lora_modules``: LoRA adapters served beside the base model, each under its own model name
    (vLLM's ``--lora-modules``): ``"NAME=PATH,NAME=PATH"`` (PEFT adapter folders; at most
    :data:`MAX_LORA_ADAPTERS`); every adapter stays resident, a request names one by its model
    name (docs/LORA.md). ``max_lora_rank``: the largest rank an adapter may have (its slot's
    size in every LoRA layer; vLLM's flag). ``lora_root``: adapters may also be loaded and unloaded
    while the engine serves (vLLM's ``/v1/load_lora_adapter``), from folders under this one only;
    None: no runtime loading. ``max_loras``: LoRA slots (resident adapters at once; vLLM's flag);
    default the ``lora_modules`` plus 4 free slots when ``lora_root`` is set.

    ``mixed_graph_max_tokens``: on CUDA (unless ``enforce_eager``; one GPU per stage and no tensor
    parallelism), steps of prefill chunks beside decodes of up to this many tokens replay
    piecewise CUDA graphs (everything but the attention, per token-count bucket: 16, 32, ...,
    this; gpu_worker/worker/mixed_graphs.py). Larger steps, and every step when 0, run eagerly.

    Images (a model that takes them, LLaVA; docs/MULTIMODAL.md): ``max_images_per_prompt`` images
    in one prompt, each at most ``max_image_bytes`` as sent (the encoded file) and
    ``max_image_pixels`` (width x height, read from the file's header before it is decoded: a
    small file may hold a huge picture).
    """

    model: str = "smollm2-135m"
    served_model_name: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    load_format: str = "auto"
    seed: int = 0
    block_size: int = 16
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None
    mixed_graph_max_tokens: int = 512
    max_num_seqs: int = 256
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.90
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    max_queue_len: int = 1024
    max_queued_tokens: int = 1 << 20
    skip_tokenizer_init: bool = False
    engine_core_process: bool | None = None
    async_scheduling: bool | None = None
    scheduling_policy: str = "fcfs"
    speculative_config: SpeculativeConfig | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_port: int | None = None
    quantization: str = "auto"
    kv_cache_dtype: str = "auto"
    calculate_kv_scales: bool = True
    fp8_weight_only_max_tokens: int | None = None
    enable_pdl: bool = True
    runner: str = "generate"
    lora_modules: str | None = None
    max_lora_rank: int = 16
    max_loras: int | None = None
    lora_root: str | None = None
    max_images_per_prompt: int = 8
    max_image_bytes: int = 10 << 20
    max_image_pixels: int = 4096 * 4096

    def __post_init__(self) -> None:
        if self.speculative_config is not None:  # LLM(speculative_config={...}) passes a dict
            spec = SpeculativeConfig.from_value(self.speculative_config)
            object.__setattr__(self, "speculative_config", spec)
        checks: list[tuple[bool, str]] = [
            (bool(self.model), "model must not be empty"),
            (self.dtype in _DTYPES, f"dtype must be one of {_DTYPES}, got {self.dtype!r}"),
            (self.load_format in _LOAD_FORMATS, f"load_format must be one of {_LOAD_FORMATS}"),
            (
                self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
                f"block_size must be a positive power of two, got {self.block_size}",
            ),
            (self.max_model_len is None or self.max_model_len > 0, "max_model_len must be positive"),
            (
                self.max_num_batched_tokens is None or self.max_num_batched_tokens > 0,
                "max_num_batched_tokens must be positive",
            ),
            (self.mixed_graph_max_tokens >= 0, "mixed_graph_max_tokens must be >= 0"),
            (self.max_images_per_prompt >= 0, "max_images_per_prompt must be >= 0"),
            (self.max_image_bytes > 0, "max_image_bytes must be positive"),
            (self.max_image_pixels > 0, "max_image_pixels must be positive"),
            (self.runner in RUNNERS, f"runner must be one of {RUNNERS}, got {self.runner!r}"),
            (
                self.runner == "generate" or self.speculative_config is None,
                "speculative_config needs runner generate (a pooling runner generates nothing)",
            ),
            (self.max_num_seqs > 0, "max_num_seqs must be positive"),
            (self.num_kv_blocks is None or self.num_kv_blocks > 0, "num_kv_blocks must be positive"),
            (
                self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0,
                "kv_cache_memory_bytes must be positive",
            ),
            (
                0.0 < self.gpu_memory_utilization <= 1.0,
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}",
            ),
            (self.max_queue_len > 0, "max_queue_len must be positive"),
            (self.max_queued_tokens > 0, "max_queued_tokens must be positive"),
            (
                not (self.skip_tokenizer_init and self.tokenizer),
                "skip_tokenizer_init and tokenizer exclude each other",
            ),
            (self.tensor_parallel_size >= 0, "tensor_parallel_size must be >= 1, or 0 (auto)"),
            (self.pipeline_parallel_size >= 1, "pipeline_parallel_size must be >= 1"),
            (
                self.distributed_port is None or 0 < self.distributed_port < 65536,
                "distributed_port must be in [1, 65535]",
            ),
            (self.quantization in QUANTIZATIONS, f"quantization must be one of {QUANTIZATIONS}, "
             f"got {self.quantization!r}"),
            (self.kv_cache_dtype in KV_CACHE_DTYPES, f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, "
             f"got {self.kv_cache_dtype!r}"),
            (
                self.fp8_weight_only_max_tokens is None
                or 0 <= self.fp8_weight_only_max_tokens <= FP8_WEIGHT_ONLY_MAX_M_LIMIT,
                f"fp8_weight_only_max_tokens must be in [0, {FP8_WEIGHT_ONLY_MAX_M_LIMIT}], "
                f"got {self.fp8_weight_only_max_tokens}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self._check_lora()
        if self.scheduling_policy not in BUILTIN_POLICIES:
            self._check_policy_plugin()

    def _check_lora(self) -> None:
        if not 1 <= self.max_lora_rank <= MAX_LORA_RANK_LIMIT:
            raise ValueError(f"max_lora_rank must be in [1, {MAX_LORA_RANK_LIMIT}], got {self.max_lora_rank}")
        adapters = self.lora_adapters
        if self.max_loras is not None and not len(adapters) <= self.max_loras <= MAX_LORA_ADAPTERS:
            raise ValueError(f"max_loras must be in [{len(adapters)} (the lora_modules), "
                             f"{MAX_LORA_ADAPTERS}], got {self.max_loras}")
        if not self.num_lora_slots:
            return
        names = [name for name, _ in adapters]
        if len(adapters) > MAX_LORA_ADAPTERS:
            raise ValueError(f"lora_modules names {len(adapters)} adapters; at most {MAX_LORA_ADAPTERS}")
        if len(set(names)) != len(names) or self.model_name in names:
            raise ValueError("lora_modules: adapter names must be distinct and differ from the served "
                             "model name")
        if self.runner != "generate" or self.speculative_config is not None:
            raise ValueError("lora_modules / lora_root need runner generate and no speculative_config")
        if self.quantization not in ("auto", "none"):
            raise ValueError("lora_modules / lora_root need 16/32-bit weights (quantization auto or none)")

    @property
    def num_lora_slots(self) -> int:
        """LoRA slots of every LoRA layer (0: no LoRA): ``max_loras``, else the ``lora_modules``
        plus 4 free ones for runtime loading when ``lora_root`` is set."""
        if self.max_loras is not None:
            return self.max_loras
        return min(len(self.lora_adapters) + (4 if self.lora_root else 0), MAX_LORA_ADAPTERS)

    @property
    def lora_adapters(self) -> tuple[tuple[str, str], ...]:
        """``lora_modules`` as (name, path) pairs, in order (adapter i takes LoRA slot i + 1)."""
        out = []
        for item in (self.lora_modules or "").split(","):
            if not item.strip():
                continue
            name, sep, path = item.strip().partition("=")
            if not sep or not name or not path:
                raise ValueError(f"lora_modules takes NAME=PATH items, got {item.strip()!r}")
            out.append((name, path))
        return tuple(out)

    def _check_policy_plugin(self) -> None:
        from gpu_worker.plugins.registry import scheduling_policy_registry

        policies = scheduling_policy_registry()
        if self.scheduling_policy not in policies:
            raise ValueError(
                f"scheduling_policy must be one of {policies.names()}, got {self.scheduling_policy!r}"
            )

    def with_device_defaults(self, device_type: str, *, offline: bool = False,
                             large_gpu: bool = False) -> EngineConfig:
        """This config with every device-dependent default that is still unset filled in.
        ``offline``: for the offline engine (no client streams from its steps); ``large_gpu``:
        the CUDA card is H100 / H200 class (``loader.is_large_gpu``)."""
        if self.max_num_batched_tokens is not None:
            return self
        if device_type != "cuda":
            default = CPU_MAX_NUM_BATCHED_TOKENS
        elif offline and large_gpu:
            default = OFFLINE_LARGE_GPU_MAX_NUM_BATCHED_TOKENS
        else:
            default = CUDA_MAX_NUM_BATCHED_TOKENS
        return replace(self, max_num_batched_tokens=default)

    @property
    def token_budget(self) -> int:
        """``max_num_batched_tokens`` once resolved (by :meth:`with_device_defaults`)."""
        if self.max_num_batched_tokens is None:
            raise ValueError("max_num_batched_tokens is unset: call with_device_defaults first")
        return self.max_num_batched_tokens

    @property
    def model_name(self) -> str:
        """The name clients use for this model."""
        return self.served_model_name or self.model

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> EngineConfig:
        """Build from ``LLM(model, **kwargs)``-style arguments, rejecting unknown names."""
        if kwargs.get("tensor_parallel_size") == "auto":
            kwargs["tensor_parallel_size"] = AUTO_TENSOR_PARALLEL
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine arguments: {unknown}; known: {sorted(known)}")
        return cls(model=model, **kwargs)
