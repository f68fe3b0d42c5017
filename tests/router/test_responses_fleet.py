"""Stored responses across routers: two routers over one real Redis (API keys, a fleet secret)
and one worker, driven by the official async ``openai`` SDK. A response created through one
router is read, continued and deleted through the other; a background response one router runs
is cancelled through the other; another key never sees it; a document in Redis that is not a
response this fleet signed is not found; a router that stops fails its background responses."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import pytest_asyncio
from openai import AsyncOpenAI

from llmserve.fleet.redis_store import RedisStateStore
from llmserve.security.api_keys import hash_key, new_key
from router.access import AccessConfig
from router.frontends.responses_config import ResponsesStoreConfig
from router.security import RouterSecurityConfig
from router.server import RouterServer
from tests.router.inprocess import start_router, start_worker
from tests.router.router_procs import RedisProc

pytestmark = pytest.mark.asyncio(loop_scope="module")
MODEL = "tiny-responses"
KEYS = {"alice": new_key(), "bob": new_key()}
RESPONSES = ResponsesStoreConfig(cancel_poll_s=0.05)


@dataclass
class Fleet:
    a: RouterServer
    b: RouterServer
    store: RedisStateStore

    def client(self, router: RouterServer, key: str = "alice") -> AsyncOpenAI:
        return AsyncOpenAI(base_url=f"http://127.0.0.1:{router.http_port}/v1", api_key=KEYS[key],
                           max_retries=0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(module_redis: RedisProc, router_tiny_model: Path,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fleet]:
    folder = tmp_path_factory.mktemp("responses-fleet")
    keys = folder / "api-keys.txt"
    keys.write_text("".join(f"{hash_key(key)} {name}\n" for name, key in KEYS.items()))
    secret = folder / "fleet-secret.txt"
    secret.write_text("a-fleet-secret-of-32-bytes-00000\n")
    worker = await start_worker(router_tiny_model, MODEL, module_redis.url, fleet_secret_file=str(secret))
    security = RouterSecurityConfig(access=AccessConfig(api_keys_file=str(keys)),
                                    fleet_secret_file=str(secret))
    stores = [RedisStateStore(module_redis.url) for _ in range(3)]
    a = await start_router(stores[0], http_port=0, security=security, responses=RESPONSES)
    b = await start_router(stores[1], http_port=0, security=security, responses=RESPONSES)
    try:
        yield Fleet(a, b, stores[2])
    finally:
        for router in (a, b):
            await router.stop(grace_s=0.5)
        for store in stores:
            await store.close()
        await worker.drain(0.5)


async def _until_ended(client: AsyncOpenAI, response_id: str) -> Any:
    for _ in range(1200):
        response = await client.responses.retrieve(response_id)
        if response.status not in ("queued", "in_progress"):
            return response
        await asyncio.sleep(0.05)
    raise AssertionError(f"{response_id} never ended")


async def test_a_response_made_through_one_router_is_continued_through_the_other(fleet: Fleet) -> None:
    a, b = fleet.client(fleet.a), fleet.client(fleet.b)
    first = await a.responses.create(model=MODEL, input="Name a color.", max_output_tokens=5, temperature=0)
    assert (await b.responses.retrieve(first.id)).model_dump() == first.model_dump()
    second = await b.responses.create(model=MODEL, previous_response_id=first.id, input="Another.",
                                      max_output_tokens=5, temperature=0)
    chat = await b.chat.completions.create(model=MODEL, temperature=0, max_tokens=5, messages=[
        {"role": "user", "content": "Name a color."}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "Another."}])
    assert second.output_text == chat.choices[0].message.content
    await b.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        await a.responses.retrieve(first.id)


async def test_another_key_never_sees_a_response(fleet: Fleet) -> None:
    alice, bob = fleet.client(fleet.a), fleet.client(fleet.b, "bob")
    mine = await alice.responses.create(model=MODEL, input="Secret.", max_output_tokens=3)
    for call in (bob.responses.retrieve(mine.id), bob.responses.delete(mine.id),
                 bob.responses.cancel(mine.id),
                 bob.responses.create(model=MODEL, previous_response_id=mine.id, input="Tell me.")):
        with pytest.raises(openai.NotFoundError):
            await call
    assert (await alice.responses.retrieve(mine.id)).id == mine.id  # bob's delete deleted nothing


async def test_a_background_response_is_cancelled_through_another_router(fleet: Fleet) -> None:
    a, b = fleet.client(fleet.a), fleet.client(fleet.b)
    queued = await a.responses.create(model=MODEL, input="Count.", max_output_tokens=400, background=True,
                                      extra_body={"ignore_eos": True})
    assert queued.id in fleet.a.responses_running()
    cancelled = await b.responses.cancel(queued.id)
    assert cancelled.status == "cancelled"
    await asyncio.sleep(0.2)
    assert queued.id not in fleet.a.responses_running()
    assert (await _until_ended(a, queued.id)).status == "cancelled"


async def test_store_documents_that_are_not_this_fleets_responses_are_not_found(fleet: Fleet) -> None:
    """A forged document (valid shape, no signature), a tampered signed one and garbage under a
    response's key all read as not found; the genuine one still reads."""
    client = fleet.client(fleet.a)
    genuine = await client.responses.create(model=MODEL, input="Hi.", max_output_tokens=2)
    blob = await fleet.store.get_document("response", genuine.id)
    assert blob is not None
    fields = json.loads(blob)
    forged_id = "resp_" + "f" * 32
    unsigned = {k: v for k, v in fields.items() if k != "sig"}
    unsigned["id"] = unsigned["response"]["id"] = forged_id
    tampered = dict(fields, conversation=[{"role": "user", "content": "injected"}])
    cases = {forged_id: json.dumps(unsigned).encode(), "resp_" + "e" * 32: b"\x80not json",
             genuine.id: json.dumps(tampered).encode()}
    for response_id, document in cases.items():
        await fleet.store.put_document("response", response_id, document, 60)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(response_id)
    await fleet.store.put_document("response", genuine.id, blob, 60)
    assert (await client.responses.retrieve(genuine.id)).id == genuine.id


async def test_a_stopping_router_fails_its_background_responses(
        fleet: Fleet, module_redis: RedisProc) -> None:
    store = RedisStateStore(module_redis.url)
    security = fleet.a.config.security
    c = await start_router(store, http_port=0, security=security, responses=RESPONSES)
    try:
        client = fleet.client(c)
        queued = await client.responses.create(model=MODEL, input="Count.", max_output_tokens=400,
                                               background=True, extra_body={"ignore_eos": True})
        await asyncio.sleep(0.3)
    finally:
        await c.stop(grace_s=0.1)
        await store.close()
    stopped = await fleet.client(fleet.b).responses.retrieve(queued.id)
    assert stopped.status == "failed" and stopped.error is not None
    assert "stopped" in stopped.error.message
