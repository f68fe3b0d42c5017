"""The router's security flags (``python -m router``): TLS, API keys and rate limits, trust in
the state store, Redis TLS. ``__main__`` adds them and builds ``RouterSecurityConfig`` here."""

from __future__ import annotations

import argparse

from llmserve.security.flags import (
    add_fleet_secret_flag,
    add_redis_tls_flags,
    add_tls_flags,
    redis_tls_from_args,
    tls_from_args,
)
from llmserve.security.rate_limit import RateLimits
from llmserve.security.tls import RedisTls
from router.access import AccessConfig
from router.security import RouterSecurityConfig


def add_security_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security (docs/SECURITY.md)")
    add_tls_flags(group, router=True)
    group.add_argument("--api-keys-file", default=None,
                       help="require API keys (authorization: Bearer) listed, hashed, in this file; "
                       "re-read when it changes (default: no authentication)")
    group.add_argument("--rate-limit-rps", type=float, default=None,
                       help="requests per second per API key unless its line sets rps= (default: unlimited)")
    group.add_argument("--rate-limit-tps", type=float, default=None,
                       help="tokens (prompt + max_tokens) per second per API key unless its line sets tps= "
                       "(default: unlimited)")
    group.add_argument("--rate-limit-burst-s", type=float, default=1.0,
                       help="seconds of its rate a key may spend at once")
    add_fleet_secret_flag(group, router=True)
    group.add_argument("--max-clock-skew-s", type=float, default=1.0,
                       help="clock difference tolerated between workers and routers when checking a "
                       "record's heartbeat age")
    group.add_argument("--max-workers-per-model", type=int, default=256,
                       help="workers of one model the router considers (lowest ids), whatever Redis holds")
    add_redis_tls_flags(group)


def security_from_args(args: argparse.Namespace) -> RouterSecurityConfig:
    """ValueError when a file is missing or settings do not fit together."""
    return RouterSecurityConfig(
        tls=tls_from_args(args),
        access=AccessConfig(api_keys_file=args.api_keys_file,
                            limits=RateLimits(args.rate_limit_rps, args.rate_limit_tps),
                            burst_s=args.rate_limit_burst_s),
        fleet_secret_file=args.fleet_secret_file,
        max_clock_skew_s=args.max_clock_skew_s,
        max_workers_per_model=args.max_workers_per_model,
    )


def redis_tls(args: argparse.Namespace) -> RedisTls:
    return redis_tls_from_args(args)
