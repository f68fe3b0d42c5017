"""Images in the engine: a LLaVA prompt with images generates, greedy and in float32 on the CPU,
exactly what HF transformers generates from the same text and images (its own processor expanding
the image tokens), token for token; and every scheduler path gives the same tokens: images split
across prefill chunks, prefix-cache hits (which an image's identity bounds), preemption, async
scheduling, tensor and pipeline parallelism (gloo). Refusals name what is wrong."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gpu_worker import LLM, SamplingParams
from llmserve.limits import LimitExceeded

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
TEXTS = [
    "<|im_start|>user\n<image>\nWhat is in the picture?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nCompare <image> with <image> please.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a careful assistant who looks at pictures and describes every detail of "
    "them.<|im_end|>\n<|im_start|>user\n<image>\nTell me about the colours and the shapes in this "
    "picture.<|im_end|>\n<|im_start|>assistant\n",
]


def picture(seed: int, size: tuple[int, int] = (40, 48)) -> Any:
    """A random RGB picture (not square: the processor resizes and crops it)."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def png(image: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


IMAGES = [[picture(1)], [picture(2), picture(3)], [picture(4)]]


@pytest.fixture(scope="module")
def llava(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("llava")


@pytest.fixture(scope="module")
def hf_llava(llava: Path) -> tuple[Any, Any]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(llava, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(llava)


def hf_greedy(hf: tuple[Any, Any], text: str, images: list[Any], max_new_tokens: int = 8) -> list[int]:
    """HF's greedy continuation of ``text`` with ``images`` (its processor expands the tokens)."""
    model, processor = hf
    inputs = processor(text=text, images=images, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0)
    return [int(t) for t in out[0, inputs["input_ids"].shape[1]:]]


def prompt(i: int, images: list[Any] | None = None) -> dict[str, Any]:
    return {"prompt": TEXTS[i], "multi_modal_data": {"image": IMAGES[i] if images is None else images}}


@pytest.fixture(scope="module")
def want(hf_llava: tuple[Any, Any]) -> list[list[int]]:
    return [hf_greedy(hf_llava, text, images) for text, images in zip(TEXTS, IMAGES, strict=True)]


def tokens(outputs: list[Any]) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_greedy_output_equals_hf_with_chunks_and_the_image_matters(
        llava: Path, hf_llava: tuple[Any, Any], want: list[list[int]]) -> None:
    # A 16-token step budget splits prompts and image spans (16 tokens each) across chunks.
    with LLM(model=str(llava), num_kv_blocks=64, max_num_batched_tokens=16) as llm:
        outputs = llm.generate([prompt(i) for i in range(3)], GREEDY)
        assert tokens(outputs) == want
        # encoded files are the same pictures
        files = llm.generate([prompt(1, [png(p) for p in IMAGES[1]])], GREEDY)
        assert tokens(files) == want[1:2]
        other = llm.generate([prompt(0, [picture(9)])], GREEDY)
        assert tokens(other) == [hf_greedy(hf_llava, TEXTS[0], [picture(9)])]
        assert tokens(other) != want[:1]  # the picture changes the answer
        stats = llm.engine.stats()
        assert stats.num_free_blocks == stats.num_total_blocks


def test_offline_chat_takes_image_parts(llava: Path, hf_llava: tuple[Any, Any]) -> None:
    """``LLM.chat`` with vLLM's content parts: a data URL and a PIL picture, rendered by the chat
    template as HF's processor renders ``{"type": "image"}`` parts."""
    import base64

    url = "data:image/png;base64," + base64.b64encode(png(picture(5))).decode()
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "And this one?"},
        {"type": "image_pil", "image_pil": picture(6)}]}]
    hf_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"},
                                                {"type": "image"}]}]
    text = hf_llava[1].apply_chat_template(hf_messages, add_generation_prompt=True)
    with LLM(model=str(llava), num_kv_blocks=32) as llm:
        got = llm.chat(messages, GREEDY)
        with pytest.raises(ValueError, match=r"messages\[0\].content\[0\].image_url: only data: "):
            remote = {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}
            llm.chat([{"role": "user", "content": [remote]}], GREEDY)
    assert tokens(got) == [hf_greedy(hf_llava, text, [picture(5), picture(6)])]


def test_prefix_cache_serves_the_same_image_only(llava: Path, hf_llava: tuple[Any, Any],
                                                 want: list[list[int]]) -> None:
    with LLM(model=str(llava), num_kv_blocks=64) as llm:
        first = llm.generate([prompt(2)], GREEDY)[0]
        again = llm.generate([prompt(2)], GREEDY)[0]
        assert tokens([first, again]) == [want[2], want[2]]
        offset = llm.get_tokenizer()(TEXTS[2])["input_ids"].index(49152)
        assert again.num_cached_tokens >= offset + 16  # the image's blocks too
        swapped = llm.generate([prompt(2, [picture(7)])], GREEDY)[0]
        assert swapped.num_cached_tokens <= offset  # blocks up to the image only
        assert tokens([swapped]) == [hf_greedy(hf_llava, TEXTS[2], [picture(7)])]


def test_preemption_and_async_scheduling_change_nothing(llava: Path, want: list[list[int]]) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    # 12 blocks of 16 tokens cannot hold the three requests with their outputs: some are preempted
    # and recomputed (their images encoded again).
    with LLM(model=str(llava), num_kv_blocks=12, max_num_batched_tokens=32) as llm:
        outputs = llm.generate([prompt(i) for i in range(3)] * 2, params)
        assert llm.engine.stats().num_preemptions > 0
    assert tokens(outputs) == want * 2
    with LLM(model=str(llava), num_kv_blocks=64, max_num_batched_tokens=16, async_scheduling=True) as llm:
        assert tokens(llm.generate([prompt(i) for i in range(3)], params)) == want


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_sharded_engines_equal_hf(tp: int, pp: int, llava: Path, want: list[list[int]]) -> None:
    """Every tensor-parallel rank runs the replicated vision tower on the images the step message
    carries; the first pipeline stage alone embeds them."""
    with LLM(model=str(llava), num_kv_blocks=64, max_num_batched_tokens=16, tensor_parallel_size=tp,
             pipeline_parallel_size=pp) as llm:
        assert tokens(llm.generate([prompt(i) for i in range(3)], GREEDY)) == want


def test_refusals_name_the_problem(llava: Path, tiny_model: Callable[[str], Path]) -> None:
    with LLM(model=str(llava), num_kv_blocks=32, max_images_per_prompt=2, max_image_bytes=4096,
             max_image_pixels=64 * 64) as llm:
        with pytest.raises(ValueError, match="1 image tokens .* for 2 image"):
            llm.generate([{"prompt": TEXTS[0], "multi_modal_data": {"image": IMAGES[1]}}], GREEDY)
        with pytest.raises(ValueError, match="0 image tokens"):
            llm.generate([{"prompt": "no picture here", "multi_modal_data": {"image": IMAGES[0]}}], GREEDY)
        with pytest.raises(ValueError, match="2 image tokens .* for 0 image"):
            llm.generate([{"prompt": TEXTS[1]}], GREEDY)
        with pytest.raises(LimitExceeded, match="max_images_per_prompt"):
            llm.generate([{"prompt": "<image>" * 3, "multi_modal_data": {"image": [picture(0)] * 3}}],
                         GREEDY)
        with pytest.raises(LimitExceeded, match=r"images\[0\] is too large: 65x64 pixels.*-max-image-pixels"):
            llm.generate([prompt(0, [picture(0, (65, 64))])], GREEDY)
        with pytest.raises(LimitExceeded, match=r"images\[0\] is too large: .* bytes.*--max-image-bytes"):
            llm.generate([prompt(0, [png(picture(0, (60, 60)))])], GREEDY)
        with pytest.raises(ValueError, match=r"images\[0\] is not an image this server can read"):
            llm.generate([prompt(0, [b"\x89PNG\r\n\x1a\n garbage"])], GREEDY)
        with pytest.raises(ValueError, match="truncate_prompt_tokens"):
            llm.generate([prompt(0)], SamplingParams(max_tokens=2, truncate_prompt_tokens=20))
        with pytest.raises(ValueError, match="multi_modal_data"):
            llm.generate([{"prompt": TEXTS[0], "multi_modal_data": {"video": b""}}], GREEDY)
        # nothing leaked, and the engine still serves
        assert len(llm.generate([prompt(0)], GREEDY)[0].outputs[0].token_ids) == 8
        stats = llm.engine.stats()
        assert stats.num_free_blocks == stats.num_total_blocks
    with LLM(model=str(tiny_model("llama")), num_kv_blocks=16) as text_only:
        with pytest.raises(ValueError, match="takes no images"):
            text_only.generate([{"prompt": "<image>", "multi_modal_data": {"image": IMAGES[0]}}], GREEDY)


def test_speculative_decoding_and_lora_are_refused_at_start(llava: Path) -> None:
    with pytest.raises(ValueError, match="speculative"):
        LLM(model=str(llava), num_kv_blocks=16,
            speculative_config={"method": "ngram", "num_speculative_tokens": 2})
