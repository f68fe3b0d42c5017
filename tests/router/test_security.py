"""Router + worker through TLS and mutual TLS on loopback, with API keys and per-key rate limits
on every door (issue 17: finding 2 and Deliver items 1-2). Certificates are made in the test.

PKI: the ``fleet`` CA signs the worker's certificate and the router's client certificate (the
worker requires one from it); the ``public`` CA signs the certificate clients see on the router.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpu_worker.server import WorkerServer
from llmserve.client import AsyncClient, LLMServeError
from llmserve.fleet.redis_store import RedisStateStore
from llmserve.kserve import grpc_service_pb2 as kserve_pb
from llmserve.kserve import grpc_service_pb2_grpc as kserve_grpc
from llmserve.security.api_keys import hash_key, new_key
from llmserve.security.tls import TlsSettings
from llmserve.v1 import generation_pb2 as gen_pb
from llmserve.v1 import generation_pb2_grpc as gen_grpc
from llmserve.v1 import internal_pb2 as ipb
from llmserve.v1 import internal_pb2_grpc as ipb_grpc
from router.access import AccessConfig
from router.security import RouterSecurityConfig
from router.server import RouterServer
from tests.helpers.certs import CertificateAuthority
from tests.router.inprocess import start_router, start_worker
from tests.router.router_procs import RedisProc

pytestmark = pytest.mark.asyncio(loop_scope="module")
MODEL = "tau"
KEYS = {name: new_key() for name in ("alice", "limited", "tokens", "other-model", "revoked", "unknown")}


@dataclass
class Secure:
    worker: WorkerServer
    router: RouterServer
    fleet: CertificateAuthority
    public: CertificateAuthority

    def channel(self, ca: Path | None = None) -> grpc.aio.Channel:
        creds = grpc.ssl_channel_credentials((ca or self.public.ca_file).read_bytes())
        return grpc.aio.secure_channel(self.router.target, creds)

    def refusals(self, limit: str) -> float:
        return self.router.metrics.registry.get_sample_value(
            "llmserve:router_refusals_total", {"model": MODEL, "limit": limit}) or 0.0


def key_file(folder: Path) -> Path:
    lines = [
        f"{hash_key(KEYS['alice'])} alice",
        f"{hash_key(KEYS['limited'])} limited rps=0.01",  # one request per 100 s
        f"{hash_key(KEYS['tokens'])} tokens tps=0.5",  # one request, then ~minutes of debt
        f"{hash_key(KEYS['other-model'])} other-model models=not-{MODEL}",
        f"{hash_key(KEYS['revoked'])} revoked revoked",
    ]
    path = folder / "api-keys.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secure(module_redis: RedisProc, router_tiny_model: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Secure]:
    folder = tmp_path_factory.mktemp("pki")
    fleet, public = CertificateAuthority(folder, "fleet"), CertificateAuthority(folder, "public")
    worker_cert, router_client = fleet.issue("worker"), fleet.issue("router")
    router_cert = public.issue("edge")
    worker = await start_worker(
        router_tiny_model, MODEL, module_redis.url,
        tls=TlsSettings(cert=str(worker_cert.cert), key=str(worker_cert.key), ca=str(fleet.ca_file)))
    store = RedisStateStore(module_redis.url)
    security = RouterSecurityConfig(
        tls=TlsSettings(cert=str(router_cert.cert), key=str(router_cert.key), ca=str(fleet.ca_file),
                        client_cert=str(router_client.cert), client_key=str(router_client.key)),
        access=AccessConfig(api_keys_file=str(key_file(folder))))
    router = await start_router(store, http_port=0, security=security)
    try:
        yield Secure(worker, router, fleet, public)
    finally:
        await router.stop(grace_s=0.5)
        await store.close()
        await worker.drain(0.5)


def bearer(name: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[name]}"),)


async def generate(channel: grpc.aio.Channel, key: str | None, model: str = MODEL,
                   max_tokens: int = 4) -> list[gen_pb.GenerateResponse]:
    request = gen_pb.GenerateRequest(model=model, prompt="Once upon a time",
                                     sampling=gen_pb.SamplingParams(max_tokens=max_tokens, temperature=0))
    metadata = bearer(key) if key else None
    call = gen_grpc.GenerationStub(channel).Generate(request, metadata=metadata, timeout=60)
    return [chunk async for chunk in call]


async def refused(channel: grpc.aio.Channel, key: str | None, model: str = MODEL) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(channel, key, model)
    return err.value


async def test_generate_end_to_end_through_tls_and_mutual_tls(secure: Secure) -> None:
    async with secure.channel() as channel:
        chunks = await generate(channel, "alice")
        assert chunks[-1].finish_reason and chunks[-1].worker_id == secure.worker.service.worker_id
        reply = await gen_grpc.GenerationStub(channel).ListModels(gen_pb.ListModelsRequest(),
                                                                  metadata=bearer("alice"))
        assert [m.name for m in reply.models] == [MODEL]


async def test_a_client_trusting_another_ca_fails_the_handshake(secure: Secure) -> None:
    async with secure.channel(secure.fleet.ca_file) as channel:  # the router's cert is the public CA's
        assert (await refused(channel, "alice")).code() == grpc.StatusCode.UNAVAILABLE


async def test_missing_unknown_and_revoked_keys_are_unauthenticated(secure: Secure) -> None:
    async with secure.channel() as channel:
        for key in (None, "unknown", "revoked"):
            err = await refused(channel, key)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (key, err)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gen_grpc.GenerationStub(channel).ListModels(gen_pb.ListModelsRequest())
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Health stays open (probes carry no key).
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    auth = secure.router.metrics.registry.get_sample_value
    assert auth("llmserve:router_auth_failures_total", {"reason": "missing"})
    assert auth("llmserve:router_auth_failures_total", {"reason": "revoked"})


async def test_a_key_not_allowed_for_the_model_is_permission_denied(secure: Secure) -> None:
    async with secure.channel() as channel:
        err = await refused(channel, "other-model")
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        reply = await gen_grpc.GenerationStub(channel).ListModels(gen_pb.ListModelsRequest(),
                                                                  metadata=bearer("other-model"))
        assert list(reply.models) == [], "ListModels shows only the models the key may use"


async def test_rate_limits_refuse_with_retry_after(secure: Secure) -> None:
    async with secure.channel() as channel:
        assert (await generate(channel, "limited"))[-1].finish_reason
        err = await refused(channel, "limited")
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate_limit_rps" in (err.details() or "")
        retry_after = dict(err.trailing_metadata() or ())["retry-after"]
        assert 1 <= int(retry_after) <= 100
        assert secure.refusals("rate_limit_rps") == 1
        assert (await generate(channel, "tokens", max_tokens=8))[-1].finish_reason  # a full bucket admits
        err = await refused(channel, "tokens")
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate_limit_tps" in (err.details() or "")
        assert int(dict(err.trailing_metadata() or ())["retry-after"]) >= 1
        assert secure.refusals("rate_limit_tps") == 1
        assert (await generate(channel, "alice"))[-1].finish_reason, "other keys are not affected"


def http(secure: Secure, path: str, key: str | None, body: dict[str, Any] | None = None
         ) -> tuple[int, dict[str, str], dict[str, Any]]:
    """One HTTPS request to the OpenAI door (verifying the router's certificate)."""
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {KEYS[key]}"
    request = urllib.request.Request(f"https://localhost:{secure.router.http_port}{path}", headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)
    context = ssl.create_default_context(cafile=str(secure.public.ca_file))
    try:
        with urllib.request.urlopen(request, context=context, timeout=60) as reply:
            return reply.status, dict(reply.headers), json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


async def test_the_http_door_over_https_with_openai_errors(secure: Secure) -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    status, _, reply = await asyncio.to_thread(http, secure, "/v1/completions", "alice", body)
    assert status == 200 and reply["choices"][0]["finish_reason"]
    status, headers, reply = await asyncio.to_thread(http, secure, "/v1/completions", None, body)
    assert status == 401 and reply["error"]["type"] == "invalid_request_error"
    assert reply["error"]["code"] is None  # OpenAI's "you didn't provide an API key"
    assert headers.get("www-authenticate") == "Bearer"
    status, _, reply = await asyncio.to_thread(http, secure, "/v1/models", "unknown")
    assert status == 401 and reply["error"]["code"] == "invalid_api_key"
    status, _, reply = await asyncio.to_thread(http, secure, "/v1/completions", "other-model", body)
    assert status == 403 and reply["error"]["code"] == "model_not_allowed"
    # "limited" has one request per 100 s: the first call here uses it, unless a test before did.
    await asyncio.to_thread(http, secure, "/v1/completions", "limited", body)
    status, headers, reply = await asyncio.to_thread(http, secure, "/v1/completions", "limited", body)
    assert status == 429 and reply["error"]["code"] == "rate_limit_exceeded"
    assert int(headers["retry-after"]) >= 1
    status, _, reply = await asyncio.to_thread(http, secure, "/health", None)
    assert status == 200
    # vLLM's tokenizer endpoints: the same key and model checks as a generation.
    tokenize = {"model": MODEL, "prompt": "Hello"}
    status, _, reply = await asyncio.to_thread(http, secure, "/tokenize", "alice", tokenize)
    assert status == 200 and reply["count"] == len(reply["tokens"]) >= 1
    for key, refused, code in ((None, 401, None), ("unknown", 401, "invalid_api_key"),
                               ("other-model", 403, "model_not_allowed")):
        detokenize = {"model": MODEL, "tokens": [1]}
        status, _, reply = await asyncio.to_thread(http, secure, "/detokenize", key, detokenize)
        assert (status, reply["error"]["code"]) == (refused, code)


async def test_the_kserve_door_needs_a_key_but_its_probes_do_not(secure: Secure) -> None:
    async with secure.channel() as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        assert (await stub.ServerLive(kserve_pb.ServerLiveRequest())).live
        request = kserve_pb.ModelInferRequest(model_name=MODEL)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelInfer(request)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelMetadata(kserve_pb.ModelMetadataRequest(name=MODEL), metadata=bearer("revoked"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = await stub.ModelMetadata(kserve_pb.ModelMetadataRequest(name=MODEL), metadata=bearer("alice"))
        assert reply.name == MODEL


async def test_model_ready_answers_for_the_callers_key_as_model_metadata_does(secure: Secure) -> None:
    async with secure.channel() as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        request = kserve_pb.ModelReadyRequest(name=MODEL)
        assert (await stub.ModelReady(request, metadata=bearer("alice"))).ready
        ready = await stub.ModelReady(request, metadata=bearer("other-model"))
        assert not ready.ready, "a key that may not use the model does not see it ready"
        metadata = kserve_pb.ModelMetadataRequest(name=MODEL)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelMetadata(metadata, metadata=bearer("other-model"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_worker_refuses_callers_without_a_fleet_client_certificate(secure: Secure) -> None:
    """Finding 2 over mTLS: Drain needs a client certificate of the fleet CA."""
    target = secure.worker.target
    intruder = CertificateAuthority(secure.fleet.folder.parent / "intruder", "intruder").issue("client")
    for client in (None, intruder):
        creds = grpc.ssl_channel_credentials(secure.fleet.ca_file.read_bytes(),
                                             client.key_pem() if client else None,
                                             client.cert_pem() if client else None)
        async with grpc.aio.secure_channel(target, creds) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ipb_grpc.WorkerControlStub(channel).Drain(ipb.DrainRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    router_client = secure.fleet.issue("operator")
    creds = grpc.ssl_channel_credentials(secure.fleet.ca_file.read_bytes(), router_client.key_pem(),
                                         router_client.cert_pem())
    async with grpc.aio.secure_channel(target, creds) as channel:
        info = await ipb_grpc.WorkerControlStub(channel).GetWorkerInfo(ipb.GetWorkerInfoRequest(), timeout=10)
    assert info.model == MODEL and not info.draining


async def test_our_client_sends_the_key_over_tls(secure: Secure) -> None:
    target, ca = secure.router.target, secure.public.ca_file
    async with AsyncClient(target, api_key=KEYS["alice"], tls_ca=ca) as client:
        completion = await client.complete(MODEL, "Once upon a time", max_tokens=3, temperature=0)
        assert completion.sequences[0].finish_reason == "length"
        assert [m.name for m in await client.list_models()] == [MODEL]
    async with AsyncClient(target, tls_ca=ca) as anonymous:
        with pytest.raises(LLMServeError) as err:
            await anonymous.list_models()
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
