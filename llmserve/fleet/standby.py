"""Warm standby: when a standby worker promotes itself. Torch-free; the worker's glue (its peer
probe, metrics) is ``gpu_worker/server/standby_link.py``.

A standby has loaded and warmed up its model and heartbeats with ``standby=True``: routers never
route to it. :class:`StandbyWatcher` reads the registry every ``poll_interval_s`` (and at once
when the peer probe reports a live worker lost) and promotes the worker when

- **capacity**: the model has fewer *live* workers than ``min_live``. Live: neither draining nor
  standby, a heartbeat at most ``stale_after_s`` old, and not reported lost by the probe (a
  killed worker's record stays in the store for its TTL, 5 s; its health stream breaks at once).
  At once when the standby has seen the live count drop below what it saw before; otherwise
  (a fleet starting, its live workers still loading) only once the standby has watched for
  ``startup_grace_s``;
- **queue**: ``queue_threshold`` is set and the model's waiting requests per live worker stay
  above it for ``queue_sustain_s`` (the timer restarts whenever the set of live workers changes,
  so a promotion gets that long to take load before the next one).

No stampede, no lock: the standbys of a model rank themselves by a rendezvous hash of (model,
worker id), which every standby computes alike from the registry; with a capacity deficit of
``d`` the first ``d`` standbys promote, on a queue alarm the first one. A standby that dies drops
out of the ranking with its record. Two standbys whose reads of the store differ (one registered
between them) can both promote once: one worker too many, never a stampede. A promoted worker
stays live (there is no demotion).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Set
from dataclasses import dataclass

from llmserve.fleet.records import WorkerRecord
from llmserve.fleet.store import StateStore, StoreUnavailable
from llmserve.security.records import RecordReader

log = logging.getLogger(__name__)

CAPACITY = "capacity"
QUEUE = "queue"


@dataclass(frozen=True)
class StandbyPolicy:
    """When a standby promotes itself (module docstring). ``min_live``: ``--standby-min-live``;
    ``queue_threshold``: ``--standby-queue-threshold`` (waiting requests per live worker; None:
    never on the queue)."""

    min_live: int = 1
    queue_threshold: float | None = None
    queue_sustain_s: float = 3.0
    stale_after_s: float = 2.5  # 2.5 heartbeats (1 s apart) missed: the worker is gone
    poll_interval_s: float = 0.25
    startup_grace_s: float = 30.0  # a deficit the standby never saw arise waits this long

    def __post_init__(self) -> None:
        if self.min_live < 1:
            raise ValueError(f"standby_min_live must be >= 1, got {self.min_live}")
        if self.queue_threshold is not None and self.queue_threshold <= 0:
            raise ValueError(f"standby_queue_threshold must be > 0, got {self.queue_threshold}")
        if (self.queue_sustain_s < 0 or self.stale_after_s <= 0 or self.poll_interval_s <= 0
                or self.startup_grace_s < 0):
            raise ValueError("need queue_sustain_s >= 0, stale_after_s > 0, poll_interval_s > 0 and "
                             "startup_grace_s >= 0")


def serving_peers(records: Iterable[WorkerRecord], model: str) -> list[WorkerRecord]:
    """Records of ``model`` that take routed requests: neither draining nor standby."""
    return [w for w in records if w.model == model and not w.draining and not w.standby]


def live_workers(peers: Iterable[WorkerRecord], lost: Set[str], now: float, stale_after_s: float
                 ) -> list[WorkerRecord]:
    """The ``peers`` not reported lost whose heartbeat (wall clock) is at most ``stale_after_s``
    old at ``now``."""
    return [w for w in peers if w.worker_id not in lost and now - w.heartbeat_at <= stale_after_s]


def standby_order(records: Iterable[WorkerRecord], model: str) -> list[str]:
    """Ids of ``model``'s standbys (not draining) in promotion order: a rendezvous hash of the
    model and the id, highest first, the same on every standby."""
    ids = [w.worker_id for w in records if w.model == model and w.standby and not w.draining]
    return sorted(ids, key=lambda wid: _rendezvous(model, wid), reverse=True)


def waiting_per_live(live: list[WorkerRecord]) -> float:
    """The live workers' waiting requests, on average."""
    return sum(w.load.num_waiting for w in live) / len(live) if live else 0.0


def _rendezvous(model: str, worker_id: str) -> int:
    digest = hashlib.blake2b(f"{model}\n{worker_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class StandbyWatcher:
    """Watches the registry for one standby worker and calls ``promote(reason)`` once, when the
    policy says so (``reason``: :data:`CAPACITY` or :data:`QUEUE`); then it stops.

    ``lost_fn`` returns the ids of live workers the peer probe saw go (empty without a probe);
    :meth:`wake` asks for a check now. ``peers`` is the model's serving workers of the last read
    (what the probe should watch). Store outages only delay the check: a standby never promotes
    on a view it could not read.
    """

    def __init__(
        self,
        store: StateStore,
        worker_id: str,
        model: str,
        policy: StandbyPolicy,
        promote: Callable[[str], Awaitable[None]],
        *,
        reader: RecordReader | None = None,
        lost_fn: Callable[[], Set[str]] = frozenset,
        on_read: Callable[[list[WorkerRecord]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``on_read`` gets the model's serving workers after every read (the probe tracks them)."""
        self.worker_id = worker_id
        self.model = model
        self.policy = policy
        self._store = store
        self._promote = promote
        self._reader = reader or RecordReader()
        self._lost_fn = lost_fn
        self._on_read = on_read
        self._clock = clock
        self._wall_clock = wall_clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._queue_ids: frozenset[str] = frozenset()
        self._queue_since: float | None = None
        self._store_down = False
        self._watching_since: float | None = None  # clock() of the first read
        self._most_live_seen = 0
        self.promoted_for: str | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"standby-{self.worker_id}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def wake(self) -> None:
        """Check now (a live worker was seen going)."""
        self._wake.set()

    async def check_once(self) -> str | None:
        """Read the registry and promote if the policy says so; the reason, or None."""
        if self.promoted_for is not None:
            return self.promoted_for
        try:
            view = await self._store.read_fleet(self._reader)
        except StoreUnavailable as exc:
            if not self._store_down:
                log.warning("standby %s: fleet store unreachable, not promoting meanwhile: %s",
                            self.worker_id, exc)
            self._store_down = True
            return None
        self._store_down = False
        peers = serving_peers(view.workers, self.model)
        if self._on_read is not None:
            self._on_read(peers)
        reason = self._decide(view.workers, live_workers(peers, self._lost_fn(), self._wall_clock(),
                                                          self.policy.stale_after_s))
        if reason is not None:
            self.promoted_for = reason
            await self._promote(reason)
        return reason

    def _decide(self, records: tuple[WorkerRecord, ...], live: list[WorkerRecord]) -> str | None:
        lost = self._capacity_was_lost(len(live))  # tracked on every read
        order = standby_order(records, self.model)
        if self.worker_id not in order:
            return None  # our own record is not in the store (yet): we cannot know our rank
        rank = order.index(self.worker_id)
        if self.policy.min_live - len(live) > rank and lost:
            return CAPACITY
        if self._queue_alarm(live) and rank == 0:
            return QUEUE
        return None

    def _capacity_was_lost(self, num_live: int) -> bool:
        """Whether a deficit counts: the live count fell below what this standby saw before, or
        it has watched for ``startup_grace_s`` (so a standby that finished loading before the
        fleet's live workers does not take their place at start-up)."""
        now = self._clock()
        if self._watching_since is None:
            self._watching_since = now
        dropped = num_live < self._most_live_seen
        self._most_live_seen = max(self._most_live_seen, num_live)
        return dropped or now - self._watching_since >= self.policy.startup_grace_s

    def _queue_alarm(self, live: list[WorkerRecord]) -> bool:
        """Whether the queue has stayed over the threshold for ``queue_sustain_s`` with the same
        live workers."""
        threshold = self.policy.queue_threshold
        high = threshold is not None and bool(live) and waiting_per_live(live) > threshold
        ids = frozenset(w.worker_id for w in live)
        now = self._clock()
        if not high:
            self._queue_since = None
        elif self._queue_since is None or ids != self._queue_ids:
            self._queue_since = now
        self._queue_ids = ids
        return self._queue_since is not None and now - self._queue_since >= self.policy.queue_sustain_s

    async def _run(self) -> None:
        while True:
            try:
                if await self.check_once() is not None:
                    return
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end the watch silently
                log.exception("standby check failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.policy.poll_interval_s)
            self._wake.clear()
