"""Settings of the Responses API's stored responses (``responses_store``, ``responses_api``) and
their flags; light (no pydantic or FastAPI import) so the router's configuration can hold them."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ResponsesStoreConfig:
    """``ttl_s``: how long a stored response is kept (0: responses are never stored, so
    ``previous_response_id`` and background responses are unavailable); ``max_record_bytes``: the
    largest stored document (a response and its conversation; a larger one is not stored);
    ``max_background``: background responses one router runs at once (429 beyond);
    ``cancel_poll_s``: how often a background response checks for a cancel request that reached
    another router."""

    ttl_s: float = 3600.0
    max_record_bytes: int = 4 * 1024 * 1024
    max_background: int = 256
    cancel_poll_s: float = 1.0

    def __post_init__(self) -> None:
        if not (self.ttl_s >= 0 and math.isfinite(self.ttl_s)):
            raise ValueError(f"responses_ttl_s must be >= 0 seconds, got {self.ttl_s}")
        if self.max_record_bytes < 1024:
            raise ValueError(f"max_stored_response_bytes must be at least 1024, got {self.max_record_bytes}")
        if self.max_background < 0:
            raise ValueError(f"max_background_responses must be >= 0, got {self.max_background}")
        if not (self.cancel_poll_s > 0 and math.isfinite(self.cancel_poll_s)):
            raise ValueError(f"cancel_poll_s must be a positive number of seconds, got {self.cancel_poll_s}")

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0


def add_responses_flags(parser: argparse.ArgumentParser) -> None:
    d = ResponsesStoreConfig()
    g = parser.add_argument_group("Responses API (/v1/responses)")
    g.add_argument("--responses-ttl-s", type=float, default=d.ttl_s,
                   help="seconds a stored response is kept for previous_response_id and GET (0: none is "
                        "stored; previous_response_id and background are then refused)")
    g.add_argument("--max-stored-response-bytes", type=int, default=d.max_record_bytes,
                   help="largest stored response with its conversation; a larger one is served but not "
                        "stored (its store says false)")
    g.add_argument("--max-background-responses", type=int, default=d.max_background,
                   help="background responses one router runs at once; more are answered 429")


def responses_config_from_args(args: argparse.Namespace) -> ResponsesStoreConfig:
    """The settings the flags of :func:`add_responses_flags` describe (ValueError when out of range)."""
    return ResponsesStoreConfig(ttl_s=args.responses_ttl_s, max_record_bytes=args.max_stored_response_bytes,
                                max_background=args.max_background_responses)
