"""Image tokens and image-aware block hashes (llmserve/multimodal.py, llmserve/hashing.py): the
expansion a router and a worker both make, the spans, the records a worker sends, the data URLs
a door takes, and the prefix hashes, equal on both sides."""

from __future__ import annotations

import base64

import pytest

from gpu_worker.core.request import Request
from gpu_worker.core.types import ImageInput
from gpu_worker.sampling_params import SamplingParams
from llmserve.hashing import block_hashes
from llmserve.multimodal import (
    ImageSpan,
    ImageTokens,
    decode_data_url,
    expand_image_tokens,
    image_hash,
    image_spans,
)
from router.routing import Router

SPEC = ImageTokens(token_id=99, per_image=3)


def test_expansion_once_per_image_or_already_expanded() -> None:
    assert expand_image_tokens([1, 99, 2, 99], SPEC, 2) == [1, 99, 99, 99, 2, 99, 99, 99]
    expanded = [1, 99, 99, 99, 2, 99, 99, 99]
    assert expand_image_tokens(expanded, SPEC, 2) == expanded  # what the router sends the worker
    assert expand_image_tokens([1, 2], SPEC, 0) == [1, 2]
    with pytest.raises(ValueError, match="1 image tokens .* for 2 image"):
        expand_image_tokens([1, 99], SPEC, 2)
    with pytest.raises(ValueError, match="2 image tokens .* for 0 image"):
        expand_image_tokens([99, 99], SPEC, 0)
    with pytest.raises(ValueError, match="not whole images"):  # 6 tokens for 2 images, cut 4 + 2
        expand_image_tokens([99, 99, 99, 99, 1, 99, 99], SPEC, 2)


def test_spans_follow_the_runs() -> None:
    ids = [5, 99, 99, 99, 99, 99, 99, 7, 99, 99, 99]
    spans = image_spans(ids, SPEC, [b"a", b"b", b"c"])
    assert spans == (ImageSpan(1, 3, b"a"), ImageSpan(4, 3, b"b"), ImageSpan(8, 3, b"c"))
    with pytest.raises(ValueError, match="3 image placeholder"):
        image_spans(ids, SPEC, [b"a", b"b", b"c", b"d"])
    with pytest.raises(ValueError, match="more image placeholders"):
        image_spans(ids, SPEC, [b"a"])


def test_records_round_trip_and_garbage_is_refused() -> None:
    spec = ImageTokens(49152, 576, "<image>")
    assert ImageTokens.from_json(spec.to_json()) == spec
    for garbage in (b"", b"[]", b'{"token_id": "1", "per_image": 2, "token": "x"}',
                    b'{"token_id": 1, "per_image": 0, "token": "x"}',
                    b'{"token_id": -1, "per_image": 2, "token": ""}'):
        with pytest.raises(ValueError, match="bad llmserve_image_tokens.json"):
            ImageTokens.from_json(garbage)


def test_data_urls() -> None:
    url = "data:image/png;base64," + base64.b64encode(b"\x89PNG").decode()
    assert decode_data_url(url, "f") == b"\x89PNG"
    for url, needle in (("https://example.com/x.png", "only data: URLs"), ("file:///etc/passwd", "only data"),
                        ("data:image/png,raw", "must be base64"),
                        ("data:image/png;base64,@@", "not valid base64"), ("/etc/passwd", "only data")):
        with pytest.raises(ValueError, match=f"^f: .*{needle}"):
            decode_data_url(url, "f")


def test_block_hashes_take_the_images_they_overlap() -> None:
    ids = list(range(10)) + [99] * 3 + list(range(20, 31))  # the image at 10..12: block 2 (of 4)
    spans_a = [ImageSpan(10, 3, image_hash(b"picture a"))]
    spans_b = [ImageSpan(10, 3, image_hash(b"picture b"))]
    plain = block_hashes(ids, 4, "m")
    a, b = block_hashes(ids, 4, "m", images=spans_a), block_hashes(ids, 4, "m", images=spans_b)
    assert plain == block_hashes(ids, 4, "m", images=())  # no images: today's hashes
    assert a[:2] == b[:2] == plain[:2]  # the blocks before the image are shared
    assert all(x != y for x, y in zip(a[2:], b[2:], strict=True))  # from the image's block on, never
    assert a[2:] != plain[2:]
    # incremental extension (a request's output blocks) continues the same chain
    assert block_hashes(ids, 4, "m", start=3, parent=a[2], images=spans_a) == a[3:]


def test_router_and_worker_hash_a_prompt_with_images_alike() -> None:
    """The router's prefix chains (Router._chains) equal the blocks the worker's scheduler hashes
    (Request.block_hashes): prefix-aware routing finds the worker that holds an image's blocks."""
    from llmserve.fleet import WorkerRecord

    ids = [1, 2, 3] + [99] * 3 + [4, 5, 6, 7, 8, 9, 10]
    spans = image_spans(ids, SPEC, [image_hash(b"png bytes")])
    worker = Request("r", ids, SamplingParams(), block_size=4, hash_seed="tiny",
                     images=tuple(ImageInput(s, None) for s in spans))
    record = WorkerRecord(worker_id="w", model="tiny", address="127.0.0.1:1", block_size=4, max_model_len=64)
    chains = Router._chains("tiny", [record], ids, spans)
    assert chains["w"] == worker.block_hashes and len(worker.block_hashes) == 3
    assert Router._chains("tiny", [record], ids)["w"][1:] != worker.block_hashes[1:]
