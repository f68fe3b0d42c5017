"""Weight formats of quantized checkpoints, converted to the layouts our kernels read.

- :mod:`.fp8_format`: fp8 e4m3 weights with per-output-channel scales (quantized at load from
  16/32-bit weights, or taken as they are from pre-quantized checkpoints), or per-block scales
  (:mod:`.fp8_block`);
- :mod:`.gptq_format`: GPTQ (HF ``quant_method: "gptq"``) -> :class:`kernels.quant_reference.WnA16Weight`;
- :mod:`.awq_format`: AWQ (HF ``quant_method: "awq"``, AutoAWQ's GEMM format) -> ``WnA16Weight``;
- :mod:`.gguf_format`: GGUF block formats (Q4_0 ... Q6_K) -> ``WnA16Weight``, with a
  dequantizing fallback for the types it cannot represent exactly.

Torch and numpy only (the ``gguf`` package is imported lazily, for the fallback). The
layouts and their rationale: docs/QUANTIZATION.md.
"""
