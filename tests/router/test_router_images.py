"""Images at the router: the tokenizer reads the model's image tokens from the worker's files, the
prompt's image tokens become the runs the worker runs (context arithmetic included), refusals
name what to fix, the prefix hashes take the images, and both doors forward the encoded files
with the expanded ids.

The tokenizer is SmolLM2's plus ``"<image>"`` and a chat template that renders image parts (no
LLaVA model is needed: the router never runs one). Stand-in workers (gRPC servers that answer one
token, send those tokenizer files and record what they get) stand behind a real router.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from llmserve.client import AsyncClient, LLMServeError
from llmserve.fleet import LoadReport, MemoryStateStore, Registry, WorkerRecord
from llmserve.hashing import block_hashes
from llmserve.limits import RequestLimits
from llmserve.multimodal import IMAGE_TOKENS_FILE, ImageTokens, image_hash, image_spans
from llmserve.prompt_input import ChatPrompt
from llmserve.v1 import generation_pb2 as gen_pb
from llmserve.v1 import generation_pb2_grpc as gen_grpc
from llmserve.v1 import internal_pb2 as int_pb
from llmserve.v1 import internal_pb2_grpc as int_grpc
from router.dispatch import InflightTracker
from router.errors import InvalidRequest, LimitRefused
from router.images import spans_of
from router.policy import make_policy
from router.routing import Router
from router.server import RouterServer
from router.tokenizers import RouterTokenizer, TokenizerCache
from tests.router.frontends.stack_proc import http_json
from tests.router.inprocess import start_router

LLAVA, TEXT = "tiny-llava", "tiny-text"
PER_IMAGE = 4
BLOCK = 16
# ChatML as SmolLM2's; a list content renders its parts in order, an image part as "<image>".
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TokenizerFiles:
    llava: dict[str, bytes]  # with "<image>" and IMAGE_TOKENS_FILE
    text: dict[str, bytes]  # SmolLM2's as a text model's worker sends them
    spec: ImageTokens


@pytest.fixture(scope="module")
def tokenizer_files(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TokenizerFiles:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = TEMPLATE
    folder = tmp_path_factory.mktemp("llava-tokenizer")
    tok.save_pretrained(folder)
    spec = ImageTokens(tok.convert_tokens_to_ids("<image>"), PER_IMAGE)
    llava = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    text = {p.name: p.read_bytes() for p in tiny_tokenizer_dir.iterdir() if p.is_file()}
    return TokenizerFiles({**llava, IMAGE_TOKENS_FILE: spec.to_json()}, text, spec)


def record(worker_id: str, model: str, address: str = "127.0.0.1:1",
           max_model_len: int = 512) -> WorkerRecord:
    load = LoadReport(max_num_seqs=8, max_queue_len=8, num_kv_blocks=32)
    return WorkerRecord(worker_id, model, address, BLOCK, max_model_len, load, heartbeat_at=time.time())


def make_router(files: TokenizerFiles, store: MemoryStateStore | None = None,
                limits: RequestLimits | None = None) -> Router:
    async def fetch(worker: WorkerRecord) -> dict[str, bytes]:
        return files.llava if worker.model == LLAVA else files.text

    return Router(Registry(store or MemoryStateStore(), cache_s=0.0), TokenizerCache(fetch),
                  make_policy("prefix"), InflightTracker(), limits)


def runs(ids: list[int], spec: ImageTokens) -> int:
    """How many image tokens ``ids`` holds, in whole images."""
    count = sum(t == spec.token_id for t in ids)
    assert count % spec.per_image == 0
    return count // spec.per_image


def test_the_tokenizer_reads_the_image_tokens_file(tokenizer_files: TokenizerFiles) -> None:
    llava = RouterTokenizer.from_files(tokenizer_files.llava)
    assert llava.image_tokens == tokenizer_files.spec
    assert llava.encode("<image>") == [tokenizer_files.spec.token_id]  # one token, as a caller writes it
    assert RouterTokenizer.from_files(tokenizer_files.text).image_tokens is None
    with pytest.raises(ValueError, match=f"bad {IMAGE_TOKENS_FILE}"):
        RouterTokenizer.from_files({**tokenizer_files.llava, IMAGE_TOKENS_FILE: b'{"token_id": "x"}'})


async def test_each_image_token_becomes_its_run(tokenizer_files: TokenizerFiles) -> None:
    router, spec = make_router(tokenizer_files), tokenizer_files.spec
    workers = [record("w", LLAVA)]
    tok = await router.tokenizers.get(LLAVA, workers)
    text = "<image>\nWhat is it? <image>"
    ids = await router.token_ids(LLAVA, workers, text, images=(b"a", b"b"))
    assert runs(ids, spec) == 2 and len(ids) == len(tok.encode(text)) + 2 * (PER_IMAGE - 1)
    assert [t for t in ids if t != spec.token_id] == [t for t in tok.encode(text) if t != spec.token_id]
    # chat parts render as the template writes them, the image where its part is
    chat = ChatPrompt(({"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"},
                                                    {"type": "text", "text": "What is it?"}]},))
    chat_ids = await router.token_ids(LLAVA, workers, chat, images=(b"a",))
    assert tok.decode(chat_ids).count("<image>") == PER_IMAGE and "Look:<image>" in tok.decode(chat_ids)
    # token ids: once per image, or already expanded (what a router sends a worker)
    once = [1, spec.token_id, 2]
    expanded = await router.token_ids(LLAVA, workers, once, images=(b"a",))
    assert expanded == [1] + [spec.token_id] * PER_IMAGE + [2]
    assert await router.token_ids(LLAVA, workers, expanded, images=(b"a",)) == expanded


async def test_text_prompts_are_tokenized_as_before(tokenizer_files: TokenizerFiles) -> None:
    router = make_router(tokenizer_files)
    for model in (LLAVA, TEXT):
        workers = [record("w", model)]
        tok = await router.tokenizers.get(model, workers)
        chat = ChatPrompt(({"role": "user", "content": "Hello there"},))
        assert await router.token_ids(model, workers, "Hello there") == tok.encode("Hello there")
        assert await router.token_ids(model, workers, chat) == tok.encode(chat)
        assert await router.token_ids(model, workers, [5, 6, 7]) == [5, 6, 7]


async def test_refusals_name_what_to_fix(tokenizer_files: TokenizerFiles) -> None:
    router = make_router(tokenizer_files)
    llava, text = [record("w", LLAVA)], [record("t", TEXT)]
    with pytest.raises(InvalidRequest, match=f"{TEXT!r} takes no images"):
        await router.token_ids(TEXT, text, "<image> Hi", images=(b"a",))
    with pytest.raises(InvalidRequest, match=r"^prompt: .*1 image tokens .* for 2 image"):
        await router.token_ids(LLAVA, llava, "<image> Hi", images=(b"a", b"b"))
    with pytest.raises(InvalidRequest, match=r"^prompt: .*1 image tokens .* for 0 image"):
        await router.token_ids(LLAVA, llava, "<image> Hi")  # a placeholder without its picture
    with pytest.raises(InvalidRequest, match=r"^prompt_token_ids: .*not whole images"):
        image = tokenizer_files.spec.token_id  # two images' tokens, cut in the wrong place
        await router.token_ids(LLAVA, llava, [image] * (PER_IMAGE - 1) + [1] + [image] * (PER_IMAGE + 1),
                               images=(b"a", b"b"))
    with pytest.raises(InvalidRequest, match="truncate_prompt_tokens"):  # it could cut an image
        await router.token_ids(LLAVA, llava, "<image> Hi", truncate=8, images=(b"a",))


async def test_the_context_counts_the_expanded_prompt(tokenizer_files: TokenizerFiles) -> None:
    router = make_router(tokenizer_files)
    tok = await router.tokenizers.get(LLAVA, [record("w", LLAVA)])
    text = "<image> Hi"
    fits_unexpanded = [record("w", LLAVA, max_model_len=len(tok.encode(text)) + 2)]
    with pytest.raises(LimitRefused, match="prompt is too long") as refused:
        await router.token_ids(LLAVA, fits_unexpanded, text, images=(b"a",))
    assert refused.value.limit == "max_model_len"


def test_the_image_count_is_admitted_against_the_flag(tokenizer_files: TokenizerFiles) -> None:
    router = make_router(tokenizer_files)
    sampling = gen_pb.SamplingParams()
    router.admit("r", "<image>" * 8, sampling, 8)
    with pytest.raises(LimitRefused, match="--max-images-per-request") as refused:
        router.admit("r", "<image>" * 9, sampling, 9)
    assert refused.value.limit == "max_images_per_request"
    strict = make_router(tokenizer_files, limits=RequestLimits(max_images_per_request=1))
    with pytest.raises(LimitRefused, match="2 images; the limit is 1"):
        strict.admit("r", "x", sampling, 2)


async def test_prefix_routing_tells_images_apart(tokenizer_files: TokenizerFiles) -> None:
    """A worker holds the blocks of a prompt with picture A (hashed as the worker hashes them):
    the same prompt with A is a prefix hit there; with picture B, the same tokens match nothing
    from the image's block on; text-only hashes of those tokens match nothing either."""
    store = MemoryStateStore()
    router, spec = make_router(tokenizer_files, store), tokenizer_files.spec
    workers = [record("w-a", LLAVA), record("w-b", LLAVA)]
    for w in workers:
        await store.heartbeat(w, ttl_s=60)
    text = "Hi <image> and then a long question " * 4
    ids = await router.token_ids(LLAVA, workers, text, images=(b"A",) * 4)
    spans_a, spans_b = spans_of(spec, ids, [b"A"] * 4), spans_of(spec, ids, [b"A", b"B", b"A", b"A"])
    assert spans_a == image_spans(ids, spec, [image_hash(b"A")] * 4) and spans_of(spec, ids, []) == ()
    held = block_hashes(ids, BLOCK, seed=LLAVA, images=spans_a)  # what the worker reports for A
    await store.replace_kv("w-b", held, ttl_s=60)
    assert Router._chains(LLAVA, workers, ids, spans_a)["w-b"] == held
    ranked = await router.rank(LLAVA, workers, ids, "r1", spans_a)
    assert ranked.reason == "prefix_hit" and ranked.workers[0].worker_id == "w-b"
    second = spans_b[1]  # B's run: the chains agree on the blocks before it, never from it on
    matched = await router.registry.longest_prefixes(Router._chains(LLAVA, workers, ids, spans_b))
    assert matched["w-b"] == second.offset // BLOCK and matched["w-a"] == 0
    text_only = await router.registry.longest_prefixes(Router._chains(LLAVA, workers, ids))
    assert text_only["w-b"] == spans_a[0].offset // BLOCK


class StandIn(gen_grpc.GenerationServicer, int_grpc.WorkerControlServicer):
    """A worker that sends its tokenizer files, answers one token and records each request."""

    def __init__(self, worker_id: str, files: dict[str, bytes]) -> None:
        self.worker_id = worker_id
        self.files = files
        self.requests: list[gen_pb.GenerateRequest] = []

    async def GetTokenizer(self, request: int_pb.GetTokenizerRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> int_pb.TokenizerFiles:
        return int_pb.TokenizerFiles(files=self.files)

    async def Generate(self, request: gen_pb.GenerateRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> AsyncIterator[gen_pb.GenerateResponse]:
        self.requests.append(request)
        usage = gen_pb.Usage(prompt_tokens=len(request.prompt_token_ids.ids), completion_tokens=1)
        yield gen_pb.GenerateResponse(token_ids=[7], text="x", finish_reason="length",
                                      worker_id=self.worker_id, usage=usage)


@dataclass
class Fleet:
    router: RouterServer
    llava: StandIn
    text: StandIn
    spec: ImageTokens
    tokenizer: RouterTokenizer

    def last(self) -> gen_pb.GenerateRequest:
        return self.llava.requests[-1]

    async def chat(self, body: dict[str, Any]) -> tuple[int, Any]:
        url = f"http://127.0.0.1:{self.router.http_port}/v1/chat/completions"
        return await asyncio.to_thread(http_json, "POST", url, {"model": LLAVA, "max_tokens": 1, **body})


@pytest_asyncio.fixture
async def fleet(tokenizer_files: TokenizerFiles) -> AsyncIterator[Fleet]:
    store, servers, standins = MemoryStateStore(), [], {}
    for wid, model, files in (("w-llava", LLAVA, tokenizer_files.llava),
                              ("w-text", TEXT, tokenizer_files.text)):
        server = grpc.aio.server()
        standins[model] = StandIn(wid, files)
        gen_grpc.add_GenerationServicer_to_server(standins[model], server)
        int_grpc.add_WorkerControlServicer_to_server(standins[model], server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        await store.heartbeat(record(wid, model, f"127.0.0.1:{port}"), ttl_s=60)
    router = await start_router(store, policy="prefix", http_port=0)
    try:
        yield Fleet(router, standins[LLAVA], standins[TEXT], tokenizer_files.spec,
                    RouterTokenizer.from_files(tokenizer_files.llava))
    finally:
        await router.stop(grace_s=0.5)
        for server in servers:
            await server.stop(None)


async def test_the_native_door_forwards_the_files_with_the_expanded_ids(fleet: Fleet) -> None:
    async with AsyncClient(fleet.router.target) as client:
        await client.complete(LLAVA, prompt="<image>\nWhat is it?", images=[b"png-a"], max_tokens=1)
        sent = fleet.last()
        assert list(sent.images) == [b"png-a"] and runs(list(sent.prompt_token_ids.ids), fleet.spec) == 1
        assert sent.prompt_token_ids.ids[:PER_IMAGE] == [fleet.spec.token_id] * PER_IMAGE
        await client.complete(LLAVA, messages=[{"role": "user", "content": "<image><image> Same?"}],
                              images=[b"one", b"two"], max_tokens=1)
        assert list(fleet.last().images) == [b"one", b"two"]
        assert runs(list(fleet.last().prompt_token_ids.ids), fleet.spec) == 2
        await client.complete(TEXT, prompt="Hello", max_tokens=1)  # a text request as before
        assert not fleet.text.requests[-1].images
        sent_before = len(fleet.llava.requests)
        for kwargs, needle in (
            ({"model": LLAVA, "prompt": "<image>" * 9, "images": [b"a"] * 9}, "--max-images-per-request"),
            ({"model": TEXT, "prompt": "<image> Hi", "images": [b"a"]}, "takes no images"),
            ({"model": LLAVA, "prompt": "<image> Hi", "images": [b"a", b"b"]}, "1 image tokens"),
            ({"model": LLAVA, "prompt": "<image> Hi", "images": [b"a"], "embed": True}, "embedding"),
            ({"model": LLAVA, "prompt": "<image> Hi", "images": [b"a"], "truncate_prompt_tokens": 4},
             "truncate_prompt_tokens"),
        ):
            with pytest.raises(LLMServeError, match=needle) as refused:
                await client.complete(max_tokens=1, **kwargs)
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert len(fleet.llava.requests) == sent_before  # no worker saw a refused request


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


async def test_the_openai_door_forwards_image_parts_in_order(fleet: Fleet) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(b"first")}},
                                     {"type": "text", "text": "and"},
                                     {"type": "image_url", "image_url": data_url(b"second")}]},  # vLLM's form
        {"role": "assistant", "content": "Two pictures."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"},
                                     {"type": "image_url", "image_url": {"url": data_url(b"third"),
                                                                         "detail": "low"}}]},
    ]
    status, reply = await fleet.chat({"messages": messages})
    assert status == 200, reply
    sent = fleet.last()
    assert list(sent.images) == [b"first", b"second", b"third"]
    ids = list(sent.prompt_token_ids.ids)
    assert runs(ids, fleet.spec) == 3
    rendered = fleet.tokenizer.decode(ids)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in rendered  # a message without images: its string
    assert f"user\n{'<image>' * PER_IMAGE}and{'<image>' * PER_IMAGE}<|im_end|>" in rendered
    assert reply["usage"]["prompt_tokens"] == len(ids)
    # no max_tokens: the chat may fill the context the expanded prompt leaves
    status, _ = await fleet.chat({"messages": messages, "max_tokens": None})
    assert status == 200 and fleet.last().sampling.max_tokens == 512 - len(ids)
    # a text chat is rendered as before: the joined text parts, no images forwarded
    status, _ = await fleet.chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                            {"type": "text", "text": "b"}]}]})
    assert status == 200 and not fleet.last().images
    chat = ChatPrompt(({"role": "user", "content": "a\nb"},))
    assert list(fleet.last().prompt_token_ids.ids) == fleet.tokenizer.encode(chat)


@pytest.mark.parametrize(("url", "needle"), [
    ("https://example.com/a.png", "only data: URLs"),
    ("file:///etc/passwd", "only data: URLs"),
    ("data:image/png;base64,@@@", "not valid base64"),
])
async def test_the_openai_door_refuses_what_it_does_not_serve(fleet: Fleet, url: str, needle: str) -> None:
    part = {"type": "image_url", "image_url": {"url": url}}
    status, reply = await fleet.chat({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Look"}, part]}]})
    assert status == 400, reply
    error = reply["error"]
    assert error["param"] == "messages[0].content[1].image_url"
    assert error["message"].startswith(error["param"]) and needle in error["message"]
    assert not fleet.llava.requests


async def test_the_openai_door_bounds_the_image_count(fleet: Fleet) -> None:
    parts = [{"type": "image_url", "image_url": {"url": data_url(b"p")}}] * 9
    status, reply = await fleet.chat({"messages": [{"role": "user", "content": parts}]})
    assert status == 400 and "--max-images-per-request" in reply["error"]["message"], reply
    status, reply = await fleet.chat({"model": TEXT, "messages": [{"role": "user", "content": parts[:1]}]})
    assert status == 400 and "takes no images" in reply["error"]["message"], reply
    assert not fleet.llava.requests and not fleet.text.requests
