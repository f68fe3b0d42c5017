"""Which LoRA adapter a request runs with (vLLM's ``LoRARequest`` shape, for the offline API)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """An adapter the engine serves (``lora_modules``, or loaded with ``LLM.load_lora_adapter``),
    by name. ``lora_int_id`` and ``lora_path`` are vLLM's fields: adapters are loaded before they
    are named, so a path, when given, must be the one the engine loaded under that name."""

    lora_name: str
    lora_int_id: int = 0
    lora_path: str = ""


LoraChoice = LoRARequest | str | None


def lora_names(choice: LoraChoice | Sequence[LoraChoice], count: int,
               served: dict[str, str]) -> list[str]:
    """The adapter name of each of ``count`` requests ("": the base model) from one choice for
    all or one per request; ``served``: name -> path of the engine's adapters (ValueError for
    any other, or for a path that is not the one loaded)."""
    many = isinstance(choice, Sequence) and not isinstance(choice, str)
    choices: list[LoraChoice] = list(choice) if many else [choice] * count  # type: ignore[arg-type,list-item]
    if len(choices) != count:
        raise ValueError(f"lora_request has {len(choices)} entries for {count} prompts")
    out = []
    for one in choices:
        name = one.lora_name if isinstance(one, LoRARequest) else (one or "")
        if name and name not in served:
            raise ValueError(f"LoRA adapter {name!r} is not served; start the engine with "
                             f"lora_modules=\"{name}=PATH\" or load it with load_lora_adapter (served: "
                             f"{sorted(served)})")
        if isinstance(one, LoRARequest) and one.lora_path and name and one.lora_path != served[name]:
            raise ValueError(f"LoRA adapter {name!r} was loaded from {served[name]!r}, not "
                             f"{one.lora_path!r}")
        out.append(name)
    return out
