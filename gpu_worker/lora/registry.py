"""Which LoRA adapter holds which slot, on the engine core (docs/LORA.md, runtime loading).

The ranks' slots follow the core's decisions: a load picks a free slot (the runner writes the
adapter into it between steps), an unload stops new requests at once and frees the slot once no
live request holds the adapter (its tokens never read an emptied slot). Torch-free.

Runtime loading reads only folders under ``lora_root`` (the operator's choice of what may be
loaded; the path is resolved, symlinks included, before the check). A name keeps its adapter's
content for the engine's lifetime: loading it again after an unload must bring the same files
(the same SHA-256), since the prefix cache keys an adapter's blocks by its name and would
otherwise serve the old adapter's K/V to the new one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class LoraUpdateError(ValueError):
    """A refused load or unload; ``kind`` is ``invalid`` (the request), ``not_found`` (no such
    adapter), ``conflict`` (the name is taken, or once meant other files) or ``full`` (no free
    slot)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind

    def __reduce__(self) -> tuple[type[LoraUpdateError], tuple[str, str]]:
        # the engine core process sends it back as a reply (multiprocessing pickles it)
        return type(self), (self.kind, str(self))


@dataclass(frozen=True)
class SlotChange:
    """What the ranks must do: put ``name`` (from ``path``) in ``slot``, or empty it (``path`` None)."""

    slot: int
    name: str
    path: str | None


def adapter_digest(path: Path) -> str:
    """SHA-256 of an adapter folder's config and weights (its identity across loads)."""
    h = hashlib.sha256()
    for file in _ADAPTER_FILES:
        target = path / file
        if target.is_file():
            h.update(file.encode() + b"\0")
            with target.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


class LoraRegistry:
    """The core's adapters. ``static``: ``lora_modules`` (slots 1..); ``num_slots`` in all;
    ``root``: runtime loading's folder (None: off); ``model_name``: the base model (no adapter
    may take its name)."""

    def __init__(self, static: Sequence[tuple[str, str]], num_slots: int, root: str | None,
                 model_name: str) -> None:
        self._root = Path(root).resolve() if root else None
        self._model_name = model_name
        self._slot_of: dict[str, int] = {name: i for i, (name, _) in enumerate(static, start=1)}
        self._free = [s for s in range(num_slots, 0, -1) if s not in self._slot_of.values()]
        self._unloading: dict[str, int] = {}
        # every name ever loaded: its files' digest, for good
        self._digest_of = {name: adapter_digest(Path(path).resolve()) for name, path in static}

    @property
    def served(self) -> tuple[str, ...]:
        """Adapters new requests may use, in slot order."""
        return tuple(sorted(self._slot_of, key=self._slot_of.__getitem__))

    def holds(self, name: str) -> bool:
        """Whether ``name`` still has a slot (served, or unloading with requests left)."""
        return name in self._slot_of or name in self._unloading

    def plan_load(self, name: str, path: str) -> tuple[SlotChange, str]:
        """The slot change that loads ``name`` from ``path`` and the files' digest (commit with
        :meth:`commit_load` once the ranks took it); :class:`LoraUpdateError` when refused."""
        if self._root is None:
            raise LoraUpdateError("invalid", "runtime LoRA loading is off on this worker (start it with "
                                  "--lora-root DIR to load adapters from folders under DIR)")
        if not name or len(name) > 128 or name == self._model_name or not name.isprintable():
            raise LoraUpdateError("invalid", f"lora_name {name[:128]!r} is not a usable model name")
        if name in self._slot_of or name in self._unloading:
            waiting = " (its unload waits for its requests)" if name in self._unloading else ""
            raise LoraUpdateError("conflict", f"LoRA adapter {name!r} is already loaded{waiting}")
        folder = Path(path).resolve()
        if not folder.is_relative_to(self._root):
            raise LoraUpdateError("invalid", f"lora_path {path[:256]!r} is not under this worker's "
                                  "--lora-root")
        if not folder.is_dir():
            raise LoraUpdateError("invalid", f"lora_path {path[:256]!r} is not a folder")
        digest = adapter_digest(folder)
        known = self._digest_of.get(name)
        if known is not None and known != digest:
            raise LoraUpdateError("conflict", f"LoRA adapter {name!r} was served with other files before; a "
                                  "name keeps its adapter for the worker's lifetime (its prefix-cache blocks "
                                  "are keyed by the name): load these files under a new name")
        if not self._free:
            raise LoraUpdateError("full", f"every LoRA slot is taken ({len(self._slot_of)} adapters, "
                                  f"{len(self._unloading)} unloading); unload one or raise --max-loras")
        return SlotChange(self._free[-1], name, str(folder)), digest

    def commit_load(self, change: SlotChange, digest: str) -> None:
        self._free.remove(change.slot)
        self._slot_of[change.name] = change.slot
        self._digest_of[change.name] = digest

    def begin_unload(self, name: str) -> None:
        """Stop serving ``name`` to new requests; its slot is freed by :meth:`releasable`."""
        slot = self._slot_of.pop(name, None)
        if slot is None:
            raise LoraUpdateError("not_found", f"LoRA adapter {name[:128]!r} is not loaded; loaded: "
                                  f"{sorted(self._slot_of)}")
        self._unloading[name] = slot

    @property
    def unloading(self) -> bool:
        """Whether an unload waits for its adapter's requests to end."""
        return bool(self._unloading)

    def releasable(self, live_names: Iterable[str]) -> list[SlotChange]:
        """The unloads no live request holds back any more (their slots are free from now on)."""
        live = set(live_names)
        done = [SlotChange(slot, name, None) for name, slot in self._unloading.items() if name not in live]
        for change in done:
            del self._unloading[change.name]
            self._free.append(change.slot)
        return done
