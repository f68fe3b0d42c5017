"""When one request reached each stage: the shared source of latency metrics, span events and logs.

A :class:`RequestTimeline` is created when a request arrives and marked as it moves on
(scheduled, tokens produced, finished). Durations come from the monotonic clock; a wall-clock
anchor taken at arrival converts marks to epoch nanoseconds for span timestamps.
Pure Python, no OpenTelemetry and no Prometheus: tracing-off code paths use it too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class RequestTimeline:
    """Stage marks of one request (one sequence), all ``time.monotonic()`` seconds.

    ``itl_s`` holds one inter-token latency per generated token after the first: a chunk of
    ``k`` tokens that arrives ``g`` seconds after the previous one counts as ``k`` gaps of
    ``g / k``, so ``len(itl_s) == num_generated_tokens - 1``.
    """

    arrival_s: float
    wall_anchor_s: float
    scheduled_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None
    finished_s: float | None = None
    num_generated_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)

    @classmethod
    def start(cls, arrival_s: float | None = None) -> RequestTimeline:
        """A timeline whose arrival is ``arrival_s`` (monotonic) or now."""
        now_mono, now_wall = time.monotonic(), time.time()
        arrival = now_mono if arrival_s is None else arrival_s
        return cls(arrival_s=arrival, wall_anchor_s=now_wall - (now_mono - arrival))

    def mark_scheduled(self, at_s: float | None = None) -> None:
        """The engine started computing the request (prefill start). Only the first mark counts:
        a preempted request keeps its original scheduling time."""
        if self.scheduled_s is None:
            self.scheduled_s = time.monotonic() if at_s is None else at_s

    def mark_tokens(self, num_tokens: int, at_s: float | None = None) -> None:
        """``num_tokens`` new output tokens became available at ``at_s`` (default now)."""
        if num_tokens <= 0:
            return
        now = time.monotonic() if at_s is None else at_s
        if self.first_token_s is None:
            self.first_token_s = now
            if self.scheduled_s is None:  # engine did not report it: prefill started at latest now
                self.scheduled_s = now
            gaps = num_tokens - 1
            gap_s = 0.0
        else:
            previous = now if self.last_token_s is None else self.last_token_s
            gaps = num_tokens
            gap_s = (now - previous) / num_tokens
        self.itl_s.extend([gap_s] * gaps)
        self.last_token_s = now
        self.num_generated_tokens += num_tokens

    def mark_finished(self, at_s: float | None = None) -> None:
        """The request ended (any reason)."""
        if self.finished_s is None:
            self.finished_s = time.monotonic() if at_s is None else at_s

    @property
    def queue_s(self) -> float | None:
        """Arrival to first scheduling, or None when never scheduled."""
        return None if self.scheduled_s is None else self.scheduled_s - self.arrival_s

    @property
    def ttft_s(self) -> float | None:
        """Arrival to first token, or None when no token was produced."""
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def prefill_s(self) -> float | None:
        """First scheduling to first token."""
        if self.first_token_s is None or self.scheduled_s is None:
            return None
        return self.first_token_s - self.scheduled_s

    @property
    def decode_s(self) -> float | None:
        """First token to last token."""
        if self.first_token_s is None or self.last_token_s is None:
            return None
        return self.last_token_s - self.first_token_s

    @property
    def e2e_s(self) -> float | None:
        """Arrival to finish, or None while running."""
        return None if self.finished_s is None else self.finished_s - self.arrival_s

    def epoch_ns(self, mono_s: float) -> int:
        """A monotonic mark as epoch nanoseconds (OpenTelemetry timestamps)."""
        return int((self.wall_anchor_s + (mono_s - self.arrival_s)) * 1e9)
