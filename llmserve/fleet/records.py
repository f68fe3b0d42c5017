"""Frozen records of the fleet state: a worker's identity, its load, and KV deltas.

Torch-free and Redis-free: router, worker and the local stack all use these.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from llmserve.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


@dataclass(frozen=True)
class LoadReport:
    """Load of one worker at one instant, as published in its heartbeat."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks held by requests, 0..1
    max_num_seqs: int = 1
    max_queue_len: int = 1
    num_kv_blocks: int = 0

    @property
    def queue(self) -> int:
        """Requests the worker holds: computing plus waiting."""
        return self.num_running + self.num_waiting


@dataclass(frozen=True)
class WorkerRecord:
    """What a worker publishes about itself every heartbeat.

    ``sig``: the record's HMAC-SHA256 under the fleet secret (``llmserve.security.records``),
    empty when unsigned. Records read from the store are checked before use (``from_json``).
    ``standby``: a warm standby (model loaded, registered): routers never route to it until it
    promotes itself (``llmserve.fleet.standby``). Stored only when True, so a live worker's record
    is what it was before standbys existed. ``quantization``, ``kv_cache_dtype``, ``weight_bytes``:
    the served weights' format, the KV cache's element type and the weights' size (ListModels
    on a router; docs/QUANTIZATION.md); stored only when set. ``adapters``: the LoRA adapters
    the worker serves besides ``model``, each under its own model name (routed like a model);
    stored only when there are some.
    """

    worker_id: str
    model: str
    address: str  # host:port routers dial
    block_size: int
    max_model_len: int
    load: LoadReport = LoadReport()
    draining: bool = False
    heartbeat_at: float = 0.0  # wall-clock time.time() of the heartbeat
    sig: str = ""
    standby: bool = False
    quantization: str = ""
    kv_cache_dtype: str = ""
    weight_bytes: int = 0
    adapters: tuple[str, ...] = ()

    @property
    def served_names(self) -> tuple[str, ...]:
        """Every model name this worker answers to: its model, then its LoRA adapters."""
        return (self.model, *self.adapters)

    def fields(self) -> dict[str, Any]:
        """The JSON object stored for this record (``sig`` only when signed, ``standby`` only
        when True, the model's formats and size only when known, ``adapters`` only when some)."""
        out = asdict(self)
        out["adapters"] = list(self.adapters)  # a JSON list: the same canonical bytes signed and read back
        for name in ("sig", "standby", "quantization", "kv_cache_dtype", "weight_bytes", "adapters"):
            if not out[name]:
                del out[name]
        return out

    def to_json(self) -> str:
        """Serialize for the state store."""
        return json.dumps(self.fields(), separators=(",", ":"))

    @classmethod
    def from_json(cls, data: str | bytes) -> WorkerRecord:
        """Parse what :meth:`to_json` wrote, every field type- and range-checked; unknown fields
        are ignored (rolling upgrades). ``llmserve.security.records.RecordRejected`` (a
        ValueError) when the bytes are not a valid record."""
        from llmserve.security.records import load_fields, record_from_fields

        return record_from_fields(load_fields(data))


@dataclass(frozen=True)
class KVDelta:
    """A change to a worker's set of cached block hashes, applied in order.

    ``stored`` hashes are added, then ``removed`` hashes are taken away. ``cleared`` means the
    worker dropped its whole prefix cache: the publisher then republishes its full set.
    """

    stored: tuple[bytes, ...] = ()
    removed: tuple[bytes, ...] = ()
    cleared: bool = False


def as_kv_delta(event: KVEvent | KVDelta) -> KVDelta:
    """Turn an engine KV event (:mod:`llmserve.kv_events`) into a :class:`KVDelta`."""
    if isinstance(event, KVDelta):
        return event
    if isinstance(event, BlockStored):
        return KVDelta(stored=event.block_hashes)
    if isinstance(event, BlockRemoved):
        return KVDelta(removed=event.block_hashes)
    if isinstance(event, AllBlocksCleared):
        return KVDelta(cleared=True)
    raise TypeError(f"not a KV event: {event!r}")
