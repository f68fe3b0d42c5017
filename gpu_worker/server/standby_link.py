"""A warm standby worker: watches its model's live workers and promotes itself when needed.

``--standby``: the worker loads and warms up its model as any worker does, then registers with
``standby=True`` (routers never route to it) and runs a
:class:`~llmserve.fleet.standby.StandbyWatcher` (when to promote, which standby promotes) fed by a
:class:`PeerProbe`. On promotion it heartbeats as a live worker at once
(``WorkerPublisher.promote``), counts ``llmserve:standby_promotions_total`` and serves like any
worker.

The probe is what makes a killed worker's replacement quick: the standby holds a gRPC health
``Watch`` stream on each live worker of its model; the stream of a SIGKILLed (or crashed, or
stopping) worker breaks as soon as its process's sockets close, long before its record's
heartbeat goes stale (``stale_after_s``) or its key expires (5 s). A worker whose stream never
reached SERVING (not reachable from here, or TLS) is left to the heartbeat check. With TLS on
the workers the probe is off and promotion waits for the heartbeat check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmserve.fleet import StateStore, WorkerPublisher, WorkerRecord
from llmserve.fleet.standby import StandbyPolicy, StandbyWatcher
from llmserve.security.records import RecordReader

logger = logging.getLogger(__name__)

ChannelFactory = Callable[[str], grpc.aio.Channel]


class PeerProbe:
    """Health ``Watch`` streams on the live workers :meth:`track` is given; a worker whose stream,
    once SERVING, breaks or turns NOT_SERVING is *lost* (:meth:`lost`) and ``on_lost`` is called.

    A lost worker that keeps heartbeating (a record newer than ``recover_after_s`` past the loss:
    the stream broke, the worker did not) is watched again."""

    def __init__(self, on_lost: Callable[[], None], channel_factory: ChannelFactory | None = None,
                 recover_after_s: float = 1.5, wall_clock: Callable[[], float] = time.time) -> None:
        self._on_lost = on_lost
        self._dial = channel_factory or (lambda address: grpc.aio.insecure_channel(address))
        self._recover_after_s = recover_after_s
        self._wall_clock = wall_clock
        self._watches: dict[str, asyncio.Task[None]] = {}
        self._lost: dict[str, float] = {}  # worker id -> wall time it was seen going

    def lost(self) -> frozenset[str]:
        return frozenset(self._lost)

    def track(self, peers: Sequence[WorkerRecord]) -> None:
        """Watch each of ``peers`` (the model's serving workers now); stop watching the others."""
        current = {w.worker_id: w for w in peers}
        for wid in [w for w in self._watches if w not in current]:
            self._watches.pop(wid).cancel()
        for wid in [w for w in self._lost if w not in current]:
            del self._lost[wid]
        for wid, worker in current.items():
            lost_at = self._lost.get(wid)
            if lost_at is not None and worker.heartbeat_at > lost_at + self._recover_after_s:
                del self._lost[wid]  # it kept heartbeating: only its stream broke
            if wid not in self._lost and wid not in self._watches:
                self._watches[wid] = asyncio.get_running_loop().create_task(
                    self._watch(wid, worker.address), name=f"peer-probe-{wid}")

    async def _watch(self, worker_id: str, address: str) -> None:
        serving = False
        try:
            async with self._dial(address) as channel:
                stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
                async for reply in stream:
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        serving = True
                    elif serving:
                        break  # draining or stopping
        except grpc.aio.AioRpcError as exc:
            logger.debug("peer probe of %s: %s", worker_id, exc.code().name)
        finally:
            if self._watches.get(worker_id) is asyncio.current_task():
                del self._watches[worker_id]
        if serving:
            logger.warning("live worker %s (%s) is gone: its health stream ended", worker_id, address)
            self._lost[worker_id] = self._wall_clock()
            self._on_lost()

    async def close(self) -> None:
        watches, self._watches = list(self._watches.values()), {}
        for task in watches:
            task.cancel()
        for task in watches:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class StandbyLink:
    """One standby worker's watcher, probe and promotion (module docstring).

    ``on_promoted(reason)`` runs after the promoting heartbeat (the worker's service and metrics
    learn it there)."""

    def __init__(self, store: StateStore, publisher: WorkerPublisher, policy: StandbyPolicy,
                 on_promoted: Callable[[str], None], *, reader: RecordReader | None = None,
                 probe_peers: bool = True) -> None:
        identity = publisher.identity
        self._publisher = publisher
        self._on_promoted = on_promoted
        self._probe = PeerProbe(self._wake) if probe_peers else None
        self.watcher = StandbyWatcher(
            store, identity.worker_id, identity.model, policy, self._promote, reader=reader,
            lost_fn=self._probe.lost if self._probe is not None else frozenset,
            on_read=self._probe.track if self._probe is not None else None,
        )

    def _wake(self) -> None:
        self.watcher.wake()

    def start(self) -> None:
        self.watcher.start()
        logger.info("warm standby for %s: promotes itself below %d live worker(s)%s",
                    self.watcher.model, self.watcher.policy.min_live,
                    "" if self.watcher.policy.queue_threshold is None else
                    f" or above {self.watcher.policy.queue_threshold:g} waiting requests per live worker")

    async def _promote(self, reason: str) -> None:
        took = await self._publisher.promote()
        logger.warning("standby %s promoted itself (%s)%s", self.watcher.worker_id, reason,
                       "" if took else "; the store missed the heartbeat, the next one retries")
        self._on_promoted(reason)
        if self._probe is not None:
            await self._probe.close()

    async def close(self) -> None:
        await self.watcher.stop()
        if self._probe is not None:
            await self._probe.close()

