"""A prompt's images, from what a caller sends to what the model reads.

For a model that takes images (its flattened config has a ``multimodal_config``: LLaVA) the front
checks each image against the worker's limits, decodes it (Pillow, imported here only), runs the
model's own HF image processor (the model folder's ``preprocessor_config.json``, as vLLM does),
and expands the prompt's image tokens into one run per image (``llmserve.multimodal``). Images
arrive as encoded files (bytes: the gRPC field, data URLs) or, offline, as ``PIL.Image`` objects.

Decoding untrusted files: the size in bytes is checked before anything reads them, the picture's
width x height from the header before it is decoded (a few KB of PNG can declare gigapixels), and
every decoding error is the caller's (a ``ValueError`` naming ``images[i]``).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu_worker.core.types import ImageInput
from llmserve.limits import LimitExceeded, flag_of, too_large
from llmserve.multimodal import ImageTokens, expand_image_tokens, image_hash, image_spans


@dataclass(frozen=True)
class ImageLimits:
    """The worker's bounds on a prompt's images (EngineConfig fields of the same names)."""

    max_images_per_prompt: int = 8
    max_image_bytes: int = 10 << 20
    max_image_pixels: int = 4096 * 4096


def image_tokens_of(hf_config: Any, tokenizer: Any | None = None) -> ImageTokens | None:
    """How the model marks an image in its prompt (None: a model that takes no images).

    LLaVA: ``(image_size / patch_size)^2`` patch features per image, one more with the ``full``
    feature strategy (the CLS position kept)."""
    mm = getattr(hf_config, "multimodal_config", None)
    if mm is None:
        return None
    vision = mm.vision_config
    token_id = getattr(mm, "image_token_id", None)
    if token_id is None:
        token_id = mm.image_token_index
    per_image = (int(vision.image_size) // int(vision.patch_size)) ** 2
    if getattr(mm, "vision_feature_select_strategy", "default") == "full":
        per_image += 1
    token = "<image>"
    if tokenizer is not None:
        token = str(tokenizer.convert_ids_to_tokens(int(token_id)))
    return ImageTokens(int(token_id), per_image, token)


def check_image_model(config: Any) -> None:
    """``ValueError`` for what an engine serving a model that takes images does not combine with
    it (``config`` an ``EngineConfig``): speculative decoding (a draft sees no images), LoRA
    adapters and the pooling runner."""
    if config.speculative_config is not None:
        raise ValueError("speculative_config: speculative decoding is not served for a model that takes "
                         "images")
    if config.num_lora_slots:
        raise ValueError("lora_modules: LoRA adapters are not served for a model that takes images")
    if config.runner != "generate":
        raise ValueError("runner: a model that takes images is served with runner generate only")


class ImageInputs:
    """One model's image preprocessing, within the worker's limits."""

    def __init__(self, tokens: ImageTokens, hf_processor: Any, limits: ImageLimits) -> None:
        self.tokens = tokens
        self._processor = hf_processor
        self.limits = limits

    @classmethod
    def load(cls, model_dir: Path, hf_config: Any, tokenizer: Any | None,
             limits: ImageLimits) -> ImageInputs | None:
        """The model's image inputs (None for a model that takes no images)."""
        tokens = image_tokens_of(hf_config, tokenizer)
        if tokens is None:
            return None
        from transformers import AutoImageProcessor

        return cls(tokens, AutoImageProcessor.from_pretrained(model_dir), limits)

    def prepare(self, token_ids: Sequence[int], images: Sequence[Any], field: str
                ) -> tuple[tuple[int, ...], tuple[ImageInput, ...]]:
        """(the prompt's ids with one run of image tokens per image, the images ready for the
        model); ``ValueError`` (``LimitExceeded`` for a bound) naming what is wrong."""
        limits = self.limits
        if len(images) > limits.max_images_per_prompt:
            raise too_large("images", len(images), "images", "max_images_per_prompt",
                            limits.max_images_per_prompt)
        try:
            ids = expand_image_tokens(token_ids, self.tokens, len(images))
        except ValueError as exc:
            raise ValueError(f"{field}: {exc}") from None
        decoded = [self._decode(i, image) for i, image in enumerate(images)]
        spans = image_spans(ids, self.tokens, [h for h, _ in decoded])
        pictures = [picture for _, picture in decoded]
        pixels = self._processor(images=pictures, return_tensors="pt")["pixel_values"] if pictures else []
        out = tuple(ImageInput(span, pixels[i].float().contiguous()) for i, span in enumerate(spans))
        return tuple(ids), out

    def _decode(self, index: int, image: Any) -> tuple[bytes, Any]:
        """(the image's hash, an RGB ``PIL.Image``) of an encoded file or a ``PIL.Image``."""
        from PIL import Image

        field = f"images[{index}]"
        limits = self.limits
        if isinstance(image, Image.Image):
            self._check_pixels(field, image.width, image.height)
            rgb = image.convert("RGB")
            return image_hash(b"%dx%d:" % rgb.size + rgb.tobytes()), rgb
        if not isinstance(image, (bytes, bytearray, memoryview)):
            raise ValueError(f"{field} must be an encoded image (bytes) or a PIL.Image, "
                             f"got {type(image).__name__}")
        data = bytes(image)
        if len(data) > limits.max_image_bytes:
            raise too_large(field, len(data), "bytes", "max_image_bytes", limits.max_image_bytes)
        try:
            with Image.open(io.BytesIO(data)) as opened:  # reads the header only
                self._check_pixels(field, opened.width, opened.height)
                opened.seek(0)  # an animation: its first frame
                rgb = opened.convert("RGB")
        except LimitExceeded:
            raise
        except Image.DecompressionBombError:  # Pillow's own bound, past ours when ours is raised
            raise LimitExceeded("max_image_pixels", f"{field} is too large: it declares more pixels than "
                                "Pillow decodes (max_image_pixels, flag "
                                f"{flag_of('max_image_pixels')})") from None
        except Exception as exc:  # any decoder error is the file's: never the worker's
            raise ValueError(f"{field} is not an image this server can read ({type(exc).__name__}: "
                             f"{str(exc)[:200]})") from None
        return image_hash(data), rgb

    def _check_pixels(self, field: str, width: int, height: int) -> None:
        bound = self.limits.max_image_pixels
        if width * height > bound:
            raise LimitExceeded(
                "max_image_pixels",
                f"{field} is too large: {width}x{height} pixels; the limit is {bound} pixels "
                f"(max_image_pixels, flag {flag_of('max_image_pixels')})")
        if width < 1 or height < 1:
            raise ValueError(f"{field} has no pixels ({width}x{height})")
