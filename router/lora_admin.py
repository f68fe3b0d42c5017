"""Runtime LoRA loading across the fleet (vLLM's ``/v1/load_lora_adapter`` and
``/v1/unload_lora_adapter``; docs/LORA.md).

The router keeps no adapter state: a load goes to every worker of the base model the registry
lists now (standbys included, draining ones not) through ``WorkerControl.LoadLoraAdapter``, and
each worker republishes its record with the adapter, which is how routers learn to route it. A
load is all or nothing over those workers: when one refuses (no free slot, a bad folder), the
workers that took it unload it again and the caller gets that worker's refusal. An unload goes
to every worker whose record lists the adapter; a worker that no longer has it counts as done.

Workers that join after a load do not have the adapter (``--lora-modules`` is how a fleet serves
an adapter for good). Each worker's ``--lora-root`` bounds what may be loaded from its disk. An
unloaded adapter is dropped from the store's models ever served: requests for it are NOT_FOUND
(vLLM's answer) on this router and on routers started later; other running routers keep every
name they have seen and answer UNAVAILABLE (503) for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import grpc

from llmserve.fleet import Registry, StoreUnavailable, WorkerRecord
from llmserve.v1 import internal_pb2 as int_pb
from llmserve.v1 import internal_pb2_grpc as int_grpc
from router.dispatch import ChannelPool
from router.errors import InvalidRequest, ModelNotFound, ModelUnavailable, RouterError, UpstreamError

log = logging.getLogger(__name__)


class LoraAdapterNotFound(RouterError):
    """No worker serves the adapter an unload names."""

    code = grpc.StatusCode.NOT_FOUND


@dataclass(frozen=True)
class WorkerRefusal:
    """One worker's refusal of a load or unload."""

    worker_id: str
    code: grpc.StatusCode
    details: str


@dataclass(frozen=True)
class LoraUpdate:
    """A fleet-wide load or unload that went through: the workers it reached."""

    adapter: str
    base_model: str
    worker_ids: tuple[str, ...]


class LoraAdmin:
    """Loads and unloads LoRA adapters on the workers of the registry, over ``channels``;
    ``timeout_s``: each worker's call (reading an adapter from disk may take a while)."""

    def __init__(self, registry: Registry, channels: ChannelPool, timeout_s: float = 120.0) -> None:
        self._registry = registry
        self._channels = channels
        self._timeout_s = timeout_s
        self._lock = asyncio.Lock()  # one update at a time from this router: a rollback sees its own load

    async def load(self, name: str, path: str, base_model: str | None) -> LoraUpdate:
        """Load the adapter at ``path`` (on the workers' disks) as ``name`` on every worker of
        ``base_model`` (None: the fleet's only base model). Raises the router error a caller
        reads: unknown or ambiguous base model, no live worker, or the first worker's refusal
        (after the others were rolled back)."""
        if not name or not path:
            raise InvalidRequest("lora_name and lora_path are required")
        async with self._lock:
            snapshot = await self._registry.refresh()
            base = _base_model(base_model, snapshot.workers, name)
            workers = _updatable(w for w in snapshot.workers if w.model == base)
            if not workers:
                raise ModelUnavailable(base, "no live worker of the model to load the adapter on")
            request = int_pb.LoadLoraAdapterRequest(lora_name=name, lora_path=path)
            results = await self._each(
                workers, lambda stub: stub.LoadLoraAdapter(request, timeout=self._timeout_s))
            refusals = [r for r in results if isinstance(r, WorkerRefusal)]
            if refusals:
                done = [w for w, r in zip(workers, results, strict=True) if not isinstance(r, WorkerRefusal)]
                await self._roll_back(name, done)
                raise _refused(refusals, f"loading LoRA adapter {name!r}")
            await self._registry.refresh()  # this router routes the adapter from now on
        log.info("LoRA adapter %s loaded on %d workers of %s", name, len(workers), base)
        return LoraUpdate(name, base, tuple(w.worker_id for w in workers))

    async def unload(self, name: str) -> LoraUpdate:
        """Unload ``name`` from every worker whose record lists it; :class:`LoraAdapterNotFound`
        when none does."""
        if not name:
            raise InvalidRequest("lora_name is required")
        async with self._lock:
            snapshot = await self._registry.refresh()
            workers = _updatable(w for w in snapshot.workers if name in w.adapters)
            if not workers:
                raise LoraAdapterNotFound(f"LoRA adapter {name!r} is not loaded on any worker")
            results = await self._unload_on(name, workers)
            refusals = [r for r in results if isinstance(r, WorkerRefusal)
                        and r.code != grpc.StatusCode.NOT_FOUND]  # already gone there: done
            if refusals:
                raise _refused(refusals, f"unloading LoRA adapter {name!r}")
            try:  # requests for it are NOT_FOUND from now on, as vLLM answers them
                await self._registry.forget_model(name)
            except StoreUnavailable:  # the workers unloaded it: a store outage only keeps it UNAVAILABLE
                log.warning("LoRA adapter %s unloaded, but the fleet store is unreachable: requests for it "
                            "are answered UNAVAILABLE rather than NOT_FOUND", name)
        log.info("LoRA adapter %s unloaded from %d workers", name, len(workers))
        return LoraUpdate(name, workers[0].model, tuple(w.worker_id for w in workers))

    async def _unload_on(self, name: str, workers: Sequence[WorkerRecord]) -> list[object]:
        request = int_pb.UnloadLoraAdapterRequest(lora_name=name)
        return await self._each(
            workers, lambda stub: stub.UnloadLoraAdapter(request, timeout=self._timeout_s))

    async def _roll_back(self, name: str, workers: Sequence[WorkerRecord]) -> None:
        if not workers:
            return
        for worker, result in zip(workers, await self._unload_on(name, workers), strict=True):
            if isinstance(result, WorkerRefusal):  # it keeps the adapter until it restarts or is unloaded
                log.warning("LoRA adapter %s: rolling back its load on worker %s failed: %s %s", name,
                            worker.worker_id, result.code.name, result.details)

    async def _each(self, workers: Sequence[WorkerRecord],
                    call: Callable[[int_grpc.WorkerControlStub], Awaitable[object]]) -> list[object]:
        """``call`` on every worker at once: each worker's reply, or its :class:`WorkerRefusal`."""
        async def one(worker: WorkerRecord) -> object:
            try:
                return await call(int_grpc.WorkerControlStub(self._channels.get(worker.address)))
            except grpc.aio.AioRpcError as exc:
                return WorkerRefusal(worker.worker_id, exc.code(), exc.details() or "")

        return list(await asyncio.gather(*(one(w) for w in workers)))


def _updatable(workers: Iterable[WorkerRecord]) -> list[WorkerRecord]:
    """The workers a LoRA update reaches: all but the draining ones, by id."""
    return sorted((w for w in workers if not w.draining), key=lambda w: w.worker_id)


def _base_model(asked: str | None, workers: Sequence[WorkerRecord], adapter: str) -> str:
    """The base model a load is for: ``asked`` when some worker serves it as its model, else the
    fleet's only base model; ModelNotFound / InvalidRequest otherwise."""
    bases = sorted({w.model for w in workers})
    if asked:
        if asked not in bases:
            raise ModelNotFound(asked, bases)
        return asked
    if len(bases) != 1:
        raise InvalidRequest(f"model: name the base model to load LoRA adapter {adapter!r} on (the fleet "
                             f"serves {bases or 'no model'})")
    return bases[0]


def _refused(refusals: Sequence[WorkerRefusal], what: str) -> UpstreamError:
    """The first refusal as the caller's error, naming every refusing worker."""
    first = refusals[0]
    others = "; ".join(f"{r.worker_id}: {r.code.name} {r.details}" for r in refusals[1:])
    details = f"{what}: worker {first.worker_id} refused: {first.details}"
    if others:
        details += f" (also {others})"
    return UpstreamError(first.code, details)
