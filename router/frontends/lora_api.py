"""vLLM's runtime LoRA endpoints at the router's OpenAI door: ``POST /v1/load_lora_adapter`` and
``POST /v1/unload_lora_adapter`` (docs/LORA.md).

Bodies as vLLM's: ``{"lora_name", "lora_path"}`` and ``{"lora_name"}``; ``model`` (our addition)
names the base model when the fleet serves several. Replies as vLLM's: 200 with the text
``Success: LoRA adapter 'NAME' added successfully.`` (``removed`` for an unload), or the door's
error JSON. ``load_inplace`` (vLLM's reload of a name with new weights) is refused: a name keeps
its adapter for a worker's lifetime, since the prefix cache keys the adapter's K/V by its name.

The endpoints exist only with ``--allow-lora-updates`` (vLLM's
``VLLM_ALLOW_RUNTIME_LORA_UPDATING``); with ``--api-keys-file`` they need an ``admin`` key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from router.access import AccessControl
from router.frontends.openai_errors import InvalidParam
from router.frontends.openai_schemas import validate
from router.lora_admin import LoraAdmin

LOAD_ROUTE = "/v1/load_lora_adapter"
UNLOAD_ROUTE = "/v1/unload_lora_adapter"
MAX_PATH_CHARS = 4096


class LoadLoraAdapterRequest(BaseModel):
    """``POST /v1/load_lora_adapter``."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(min_length=1, max_length=MAX_PATH_CHARS)
    model: str | None = None  # the base model (needed when the fleet serves several)
    load_inplace: bool = False


class UnloadLoraAdapterRequest(BaseModel):
    """``POST /v1/unload_lora_adapter`` (vLLM's ``lora_int_id`` is accepted and ignored)."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1, max_length=128)
    lora_int_id: int | None = None


@dataclass(frozen=True)
class LoraEndpoints:
    """The two endpoints over the fleet's :class:`LoraAdmin`, for admin callers only."""

    admin: LoraAdmin
    access: AccessControl

    async def load(self, data: dict[str, Any]) -> str:
        """The reply text of a load; a ``RouterError`` (an ``InvalidParam`` included) otherwise."""
        self.access.admit_admin("load LoRA adapters")
        parsed = validate(LoadLoraAdapterRequest, data)
        if parsed.load_inplace:
            raise InvalidParam("load_inplace", "load_inplace is not served: a name keeps its adapter for a "
                               "worker's lifetime (the prefix cache keys its blocks by the name); load the "
                               "new weights under a new name")
        await self.admin.load(parsed.lora_name, parsed.lora_path, parsed.model)
        return f"Success: LoRA adapter '{parsed.lora_name}' added successfully."

    async def unload(self, data: dict[str, Any]) -> str:
        """The reply text of an unload; a ``RouterError`` otherwise."""
        self.access.admit_admin("unload LoRA adapters")
        parsed = validate(UnloadLoraAdapterRequest, data)
        await self.admin.unload(parsed.lora_name)
        return f"Success: LoRA adapter '{parsed.lora_name}' removed successfully."
