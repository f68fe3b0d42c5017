"""Token buckets per API key: requests per second and tokens per second.

A bucket holds up to ``capacity`` (``rate * burst_s``, at least one request) and refills at
``rate`` per second. A request is admitted when the bucket holds its cost (or, for a cost larger
than the whole bucket, when the bucket is full); the cost is then taken, possibly leaving the
bucket in debt, so a key's long-run rate never exceeds ``rate`` whatever its requests' sizes.
A refused request learns how long until it would be admitted (the ``retry-after`` it is sent).

Token costs are estimates taken before generation (prompt + ``max_tokens`` x ``n``); what was
not used is given back when the request ends (:meth:`TokenBucket.give_back`).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class RateLimits:
    """Per-key limits; None means unlimited."""

    requests_per_s: float | None = None
    tokens_per_s: float | None = None

    def __post_init__(self) -> None:
        for name, value in (("requests_per_s", self.requests_per_s), ("tokens_per_s", self.tokens_per_s)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number or unlimited, got {value}")


class TokenBucket:
    """One bucket (not thread-safe on its own: :class:`KeyLimiter` holds the lock)."""

    __slots__ = ("rate", "capacity", "_level", "_at")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self._level = capacity
        self._at = now

    def _refill(self, now: float) -> None:
        self._level = min(self.capacity, self._level + (now - self._at) * self.rate)
        self._at = now

    def take(self, cost: float, now: float) -> float:
        """Take ``cost`` and return 0, or take nothing and return the seconds until it fits."""
        self._refill(now)
        need = min(cost, self.capacity)
        if self._level >= need:
            self._level -= cost
            return 0.0
        return (need - self._level) / self.rate

    def give_back(self, amount: float, now: float) -> None:
        """Return an over-estimated part of a cost (never above capacity)."""
        self._refill(now)
        self._level = min(self.capacity, self._level + amount)


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused: ``limit`` (a metric label) and when to retry."""

    limit: str  # "api_key_requests" or "api_key_tokens"
    retry_after_s: float


REQUESTS_LIMIT = "api_key_requests"
TOKENS_LIMIT = "api_key_tokens"


class KeyLimiter:
    """Token buckets per key id (two per key: requests and tokens).

    Buckets exist only for the keys passed to :meth:`retain` (the key file's), so memory is
    bounded by the key file, never by traffic. ``burst_s``: seconds of rate a bucket holds.
    """

    def __init__(self, burst_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        if not burst_s > 0:
            raise ValueError("burst_s must be > 0")
        self._burst_s = burst_s
        self._clock = clock
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._lock = threading.Lock()

    def _bucket(self, key_id: str, kind: str, rate: float) -> TokenBucket:
        bucket = self._buckets.get((key_id, kind))
        if bucket is None or bucket.rate != rate:  # new key, or its limit changed in the file
            capacity = max(rate * self._burst_s, 1.0)
            bucket = TokenBucket(rate, capacity, self._clock())
            self._buckets[(key_id, kind)] = bucket
        return bucket

    def admit_request(self, key_id: str, limits: RateLimits) -> Refusal | None:
        """Take one request from the key's request bucket (None: admitted)."""
        if limits.requests_per_s is None:
            return None
        with self._lock:
            wait = self._bucket(key_id, REQUESTS_LIMIT, limits.requests_per_s).take(1.0, self._clock())
        return Refusal(REQUESTS_LIMIT, wait) if wait > 0 else None

    def admit_tokens(self, key_id: str, limits: RateLimits, tokens: int) -> Refusal | None:
        """Take ``tokens`` (an estimate) from the key's token bucket (None: admitted)."""
        if limits.tokens_per_s is None:
            return None
        with self._lock:
            wait = self._bucket(key_id, TOKENS_LIMIT, limits.tokens_per_s).take(float(tokens), self._clock())
        return Refusal(TOKENS_LIMIT, wait) if wait > 0 else None

    def give_back_tokens(self, key_id: str, limits: RateLimits, tokens: int) -> None:
        """Return ``tokens`` of an estimate that the request did not use."""
        if limits.tokens_per_s is None or tokens <= 0:
            return
        with self._lock:
            bucket = self._buckets.get((key_id, TOKENS_LIMIT))
            if bucket is not None:
                bucket.give_back(float(tokens), self._clock())

    def retain(self, key_ids: Iterable[str]) -> None:
        """Drop the buckets of keys no longer in the key file."""
        keep = set(key_ids)
        with self._lock:
            for key in [k for k in self._buckets if k[0] not in keep]:
                del self._buckets[key]
