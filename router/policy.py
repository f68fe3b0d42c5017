"""Routing policies: rank a model's candidate workers for one request, best first.

``prefix`` (default) scores each worker as

    score = matched_blocks / prompt_blocks  +  HOME_BONUS * [worker is the prefix's home]
            -  LOAD_WEIGHT * load
    load  = (running + waiting + this router's unreported sends) / max_num_seqs + KV_WEIGHT * kv_usage

The *home* of a request is the candidate with the highest rendezvous hash of the request's first
block and the worker id: requests that start alike (a tenant's system prompt) meet on one worker
on every router, even before any KV event has been published, so a new prefix is cached once
rather than on whichever worker looked idlest to each router. A hot-prefix guard keeps that from
piling up: a worker whose queue exceeds the least-loaded candidate's by more than
``max(GUARD_MIN, GUARD_FRACTION * max_num_seqs)`` gets neither prefix credit nor the home bonus,
so one popular shared prefix spreads to other workers (which then cache it too).
``least-load`` ranks by load alone and ``round-robin`` rotates through each model's workers; both
ignore the prefix.
All rankings except round-robin are pure functions of the fleet state and the request, so
routers sharing Redis agree.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from llmserve.fleet import WorkerRecord

LOAD_WEIGHT = 0.5
KV_WEIGHT = 0.5
GUARD_MIN = 2
GUARD_FRACTION = 0.5
HOME_BONUS = 0.25


@dataclass(frozen=True)
class Candidate:
    """A worker as a policy sees it for one request."""

    worker: WorkerRecord
    matched_blocks: int = 0  # leading prompt blocks cached on this worker
    unreported: int = 0  # requests this router sent there after its last heartbeat

    @property
    def queue(self) -> int:
        return self.worker.load.queue + self.unreported

    @property
    def load_score(self) -> float:
        """Queue over capacity plus weighted KV usage: what the policies weigh against prefix hits."""
        load = self.worker.load
        return self.queue / max(1, load.max_num_seqs) + KV_WEIGHT * load.kv_usage

    @property
    def full(self) -> bool:
        """Over its queue limit: running slots and waiting queue both full."""
        load = self.worker.load
        return self.queue >= load.max_num_seqs + load.max_queue_len


@dataclass(frozen=True)
class RouteQuery:
    """What a policy knows of the request."""

    model: str
    prompt_blocks: int  # full blocks in the prompt
    affinity_key: bytes  # first block's hash (or the prompt's) for stable tie-breaks
    request_key: bytes = b""  # differs per request (least-load's tie-break)


@dataclass(frozen=True)
class Ranked:
    """A ranking with each candidate's score, best first (for logs, traces and tests)."""

    candidates: tuple[Candidate, ...]
    scores: tuple[float, ...]
    reason: str

    @property
    def workers(self) -> list[WorkerRecord]:
        return [c.worker for c in self.candidates]


def rendezvous(key: bytes, worker_id: str) -> int:
    """Highest-random-weight hash: a stable pseudo-random order of workers per key."""
    return int.from_bytes(hashlib.blake2b(key + worker_id.encode(), digest_size=8).digest(), "big")


class Policy(abc.ABC):
    """Ranks candidates (never empty, none full) for one request."""

    name: str = ""
    uses_prefix: bool = False  # whether the router must look up cached prefixes

    @abc.abstractmethod
    def rank(self, query: RouteQuery, candidates: Sequence[Candidate]) -> Ranked:
        """All candidates, best first."""


class PrefixPolicy(Policy):
    """Cached-prefix overlap against load, with the hot-prefix guard (module docstring)."""

    name = "prefix"
    uses_prefix = True

    def score(self, query: RouteQuery, c: Candidate, min_queue: int, home: str) -> tuple[float, bool]:
        """(score, guarded): guarded candidates get no prefix credit and no home bonus."""
        slack = max(GUARD_MIN, GUARD_FRACTION * c.worker.load.max_num_seqs)
        guarded = c.queue - min_queue > slack
        if guarded:
            return -LOAD_WEIGHT * c.load_score, True
        hit = c.matched_blocks / query.prompt_blocks if query.prompt_blocks else 0.0
        bonus = HOME_BONUS if c.worker.worker_id == home else 0.0
        return hit + bonus - LOAD_WEIGHT * c.load_score, False

    def rank(self, query: RouteQuery, candidates: Sequence[Candidate]) -> Ranked:
        min_queue = min(c.queue for c in candidates)
        key = query.affinity_key
        home = max(candidates, key=lambda c: rendezvous(key, c.worker.worker_id)).worker.worker_id
        scored = [(self.score(query, c, min_queue, home), c) for c in candidates]
        scored.sort(key=lambda s: (-s[0][0], -rendezvous(query.affinity_key, s[1].worker.worker_id)))
        best = scored[0][1]
        if any(guarded and c.matched_blocks > best.matched_blocks for (_, guarded), c in scored):
            reason = "hot_prefix_guard"
        elif best.matched_blocks > 0:
            reason = "prefix_hit"
        else:
            reason = "no_prefix"
        return Ranked(tuple(c for _, c in scored), tuple(s for (s, _), _ in scored), reason)


class LeastLoadPolicy(Policy):
    """Least loaded first; ties broken per request (no affinity)."""

    name = "least-load"

    def rank(self, query: RouteQuery, candidates: Sequence[Candidate]) -> Ranked:
        key = query.request_key
        ordered = sorted(candidates, key=lambda c: (c.load_score, rendezvous(key, c.worker.worker_id)))
        return Ranked(tuple(ordered), tuple(-c.load_score for c in ordered), "least_load")


@dataclass
class RoundRobinPolicy(Policy):
    """Rotates through each model's candidates (per router process; one turn counter per model
    is its only state, so requests for one model never skip another's workers). The counters
    are as many as the models this router has routed, the fleet's models."""

    name = "round-robin"
    _turns: dict[str, int] = field(default_factory=dict)

    def rank(self, query: RouteQuery, candidates: Sequence[Candidate]) -> Ranked:
        ordered = sorted(candidates, key=lambda c: c.worker.worker_id)
        turn = self._turns.get(query.model, 0)
        self._turns[query.model] = turn + 1
        start = turn % len(ordered)
        ordered = ordered[start:] + ordered[:start]
        return Ranked(tuple(ordered), tuple(0.0 for _ in ordered), "round_robin")


POLICY_NAMES = ("prefix", "least-load", "round-robin")


def make_policy(name: str) -> Policy:
    """A fresh policy by name (one of :data:`POLICY_NAMES`)."""
    factories: dict[str, type[Policy]] = {
        "prefix": PrefixPolicy,
        "least-load": LeastLoadPolicy,
        "round-robin": RoundRobinPolicy,
    }
    if name not in factories:
        raise ValueError(f"unknown policy {name!r}; choose one of {POLICY_NAMES}")
    return factories[name]()
