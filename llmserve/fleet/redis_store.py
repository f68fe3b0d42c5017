"""``StateStore`` over Redis: the only module of llmserve that imports ``redis``.

Layout (``docs/DESIGN.md``, prefix ``llmserve``):

``{p}:worker:{id}``  JSON WorkerRecord, TTL;  ``{p}:workers``  set of ids;  ``{p}:models``  set of
model names ever served;  ``{p}:kv:{id}``  set of 16-byte block hashes, TTL refreshed by heartbeat;
``{p}:kvsync:{id}``  marker, TTL; missing means the KV set must be republished;
``{p}:epoch``  random token set once (``SET NX``) per Redis lifetime: a change tells routers that
Redis lost its data and workers are re-registering. Every heartbeat offers a *fresh* random
token, so the first heartbeat after a loss writes a new epoch (no worker re-writes an old one).
``{p}:doc:{kind}:{key}``  an opaque document the routers share (a stored Responses API
response), TTL.

Authentication and TLS come with the URL (``rediss://user:password@host:6380/0``, an ACL user
and password) and :class:`RedisTls` (CA bundle, client certificate). Everything read back is
untrusted: records go through a ``RecordReader``, names are decoded leniently and checked.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from llmserve.fleet.records import KVDelta, WorkerRecord
from llmserve.fleet.store import (
    FleetView,
    StateStore,
    StoreUnavailable,
    checked_models,
    leading_matches,
    parse_records,
)
from llmserve.security.records import RecordReader, over_limit
from llmserve.security.tls import RedisTls

T = TypeVar("T")
_CHUNK = 1000  # hashes per SADD when republishing a whole KV set


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


class RedisStateStore(StateStore):
    """Fleet state in Redis. Fails fast (one reconnect attempt) so callers can fall back."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "llmserve",
        connect_timeout_s: float = 1.0,
        op_timeout_s: float = 2.0,
        tls: RedisTls = RedisTls(),
    ) -> None:
        self._redis = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=op_timeout_s,
            retry=Retry(NoBackoff(), 1),
            decode_responses=False,
            **tls.connection_kwargs(url),
        )
        self._p = prefix

    def _k(self, *parts: str) -> str:
        return ":".join((self._p, *parts))

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    async def heartbeat(self, record: WorkerRecord, ttl_s: float) -> bool:
        ttl_ms = int(ttl_s * 1000)
        wid = record.worker_id

        async def run() -> list[Any]:
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(self._k("worker", wid), record.to_json(), px=ttl_ms)
            pipe.sadd(self._k("workers"), wid)
            pipe.sadd(self._k("models"), *record.served_names)
            pipe.pexpire(self._k("kv", wid), ttl_ms)
            pipe.pexpire(self._k("kvsync", wid), ttl_ms)
            # A fresh token each time: only the first write after the store lost its data lands.
            pipe.set(self._k("epoch"), uuid.uuid4().hex, nx=True)
            return await pipe.execute()

        results = await self._call(run)
        return bool(results[4])

    async def replace_kv(self, worker_id: str, hashes: Iterable[bytes], ttl_s: float) -> None:
        ttl_ms = int(ttl_s * 1000)
        items = list(hashes)
        key = self._k("kv", worker_id)

        async def run() -> None:
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(key)
            for i in range(0, len(items), _CHUNK):
                pipe.sadd(key, *items[i : i + _CHUNK])
            pipe.pexpire(key, ttl_ms)
            pipe.set(self._k("kvsync", worker_id), b"1", px=ttl_ms)
            await pipe.execute()

        await self._call(run)

    async def apply_kv(self, worker_id: str, deltas: Sequence[KVDelta], ttl_s: float) -> None:
        key = self._k("kv", worker_id)

        async def run() -> None:
            pipe = self._redis.pipeline(transaction=False)
            for delta in deltas:
                if delta.stored:
                    pipe.sadd(key, *delta.stored)
                if delta.removed:
                    pipe.srem(key, *delta.removed)
            pipe.pexpire(key, int(ttl_s * 1000))
            await pipe.execute()

        await self._call(run)

    async def remove_worker(self, worker_id: str) -> None:
        async def run() -> None:
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(self._k("worker", worker_id), self._k("kv", worker_id), self._k("kvsync", worker_id))
            pipe.srem(self._k("workers"), worker_id)
            await pipe.execute()

        await self._call(run)

    async def forget_model(self, name: str) -> None:
        async def run() -> None:
            await self._redis.srem(self._k("models"), name)

        await self._call(run)

    async def read_fleet(self, reader: RecordReader | None = None) -> FleetView:
        reader = reader or RecordReader()

        async def run() -> FleetView:
            pipe = self._redis.pipeline(transaction=False)
            pipe.smembers(self._k("workers"))
            pipe.smembers(self._k("models"))
            pipe.get(self._k("epoch"))
            ids_raw, models_raw, epoch = await pipe.execute()
            ids, rejected = over_limit([_text(i) for i in ids_raw], reader.max_records)
            records: list[WorkerRecord] = []
            if ids:
                blobs = await self._redis.mget([self._k("worker", i) for i in ids])
                stale = [i for i, blob in zip(ids, blobs, strict=True) if blob is None]
                records, bad = parse_records(
                    [(i, blob) for i, blob in zip(ids, blobs, strict=True) if blob is not None], reader)
                rejected = bad + rejected
                if stale:
                    await self._redis.srem(self._k("workers"), *stale)
            return FleetView(
                workers=tuple(records),
                models=checked_models((_text(m) for m in models_raw), reader.max_records),
                epoch=_text(epoch) if isinstance(epoch, bytes) else None,
                rejected=tuple(rejected),
            )

        return await self._call(run)

    async def match_prefixes(self, queries: Mapping[str, Sequence[bytes]]) -> dict[str, int]:
        asked = [(wid, chain) for wid, chain in queries.items() if chain]
        out = {wid: 0 for wid in queries}
        if not asked:
            return out

        async def run() -> list[Any]:
            pipe = self._redis.pipeline(transaction=False)
            for wid, chain in asked:
                pipe.smismember(self._k("kv", wid), list(chain))
            return await pipe.execute()

        results = await self._call(run)
        for (wid, _), flags in zip(asked, results, strict=True):
            out[wid] = leading_matches(flags)
        return out

    async def put_document(self, kind: str, key: str, blob: bytes, ttl_s: float) -> None:
        ttl_ms = max(1, int(ttl_s * 1000))
        await self._call(lambda: self._redis.set(self._k("doc", kind, key), blob, px=ttl_ms))

    async def get_document(self, kind: str, key: str) -> bytes | None:
        raw = await self._call(lambda: self._redis.get(self._k("doc", kind, key)))
        if raw is None:
            return None
        return raw if isinstance(raw, bytes) else raw.encode()

    async def delete_document(self, kind: str, key: str) -> bool:
        return bool(await self._call(lambda: self._redis.delete(self._k("doc", kind, key))))

    async def close(self) -> None:
        try:
            await self._redis.aclose()
        except (RedisError, OSError):
            pass
