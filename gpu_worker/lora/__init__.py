"""Multi-LoRA serving (docs/LORA.md): every adapter of ``EngineConfig.lora_modules`` resident,
requests of the base model and of each adapter mixed in one batch.

- :mod:`gpu_worker.lora.adapter` reads and validates adapters saved in the PEFT format
  (``adapter_config.json`` + ``adapter_model.safetensors``) for the Llama-family models;
- :mod:`gpu_worker.lora.layers` stacks them into each projection (a slot per adapter, sharded as
  the weights are) and applies them per token (``kernels`` ``lora_shrink`` / ``lora_expand``);
- :mod:`gpu_worker.lora.request` names a request's adapter (vLLM's ``LoRARequest``).
"""
