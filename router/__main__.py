"""``python -m router`` / ``llmserve-router``: one stateless router replica.

    python -m router --port 50050 --redis-url redis://localhost:6379/0 [--policy prefix]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Sequence

from router.policy import POLICY_NAMES
from router.server import RouterConfig, serve


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llmserve-router", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="0.0.0.0", help="interface to bind (default: all)")
    p.add_argument("--port", type=int, default=50050)
    p.add_argument("--redis-url", required=True, help="fleet state store, e.g. redis://localhost:6379/0")
    p.add_argument("--policy", choices=POLICY_NAMES, default="prefix")
    p.add_argument("--max-attempts", type=int, default=3, help="workers tried before the first token")
    p.add_argument("--registry-cache-s", type=float, default=1.0)
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = RouterConfig(
        host=args.host,
        port=args.port,
        policy=args.policy,
        max_attempts=args.max_attempts,
        registry_cache_s=args.registry_cache_s,
    )
    from llmserve.fleet.redis_store import RedisStateStore

    asyncio.run(serve(config, RedisStateStore(args.redis_url)))


if __name__ == "__main__":
    main()
