"""Connection limits of the router's HTTP door (the OpenAI API): how long a client may take to
send a request's headers and how long it may pause inside its body, how large the headers may
be, and how many connections may be open at once.

Each refusal is an HTTP status with OpenAI's error JSON naming the limit and its flag, sent
before the connection closes, and counted in ``llmserve:router_refusals_total{limit=...}`` (the
model label is ``unknown``: no request was read). Enforced by
:class:`router.frontends.http_server.GuardedHttpProtocol`; light (no uvicorn import) so the
router's configuration can hold it.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class HttpConnectionLimits:
    """``header_timeout_s``: from a connection's start, or a request's first byte on a kept-alive
    connection, to the end of the request's headers (408 beyond); ``body_timeout_s``: the longest
    pause between two reads of a request body (408 beyond; pauses the router asks for, while
    its reader is behind, do not count); ``max_header_bytes``: the request line and headers (431
    beyond); ``max_connections``: open connections, a new one past it is answered 503 with
    ``Retry-After`` and closed."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_header_bytes: int = 64 * 1024
    max_connections: int = 4096

    def __post_init__(self) -> None:
        for name, value in (("http_header_timeout_s", self.header_timeout_s),
                            ("http_body_timeout_s", self.body_timeout_s)):
            if not (value > 0 and math.isfinite(value)):  # NaN fails both
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")
        if self.max_header_bytes < 1024:
            raise ValueError(f"max_http_header_bytes must be at least 1024, got {self.max_header_bytes}")
        if self.max_connections < 1:
            raise ValueError(f"max_http_connections must be at least 1, got {self.max_connections}")


def add_http_flags(parser: argparse.ArgumentParser) -> None:
    d = HttpConnectionLimits()
    g = parser.add_argument_group("HTTP connections (the OpenAI door)")
    g.add_argument("--http-header-timeout-s", type=float, default=d.header_timeout_s,
                   help="seconds from a connection's start (or a request's first byte) to the end of the "
                        "request's headers; later is answered 408 and closed")
    g.add_argument("--http-body-timeout-s", type=float, default=d.body_timeout_s,
                   help="longest pause while a request body arrives; longer is answered 408 and closed")
    g.add_argument("--max-http-header-bytes", type=int, default=d.max_header_bytes,
                   help="largest request line and headers; larger is answered 431 and closed")
    g.add_argument("--max-http-connections", type=int, default=d.max_connections,
                   help="open HTTP connections; a new one past this is answered 503 and closed")


def http_limits_from_args(args: argparse.Namespace) -> HttpConnectionLimits:
    """The limits the flags of :func:`add_http_flags` describe (ValueError when out of range)."""
    return HttpConnectionLimits(
        header_timeout_s=args.http_header_timeout_s, body_timeout_s=args.http_body_timeout_s,
        max_header_bytes=args.max_http_header_bytes, max_connections=args.max_http_connections,
    )
