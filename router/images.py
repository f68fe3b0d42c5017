"""A request's images at the router: its prompt expanded as the workers expand it, and the image
spans its prefix hashes take (``llmserve.multimodal``).

The router never decodes an image: it counts them, hashes their bytes and forwards them with the
expanded token ids in ``GenerateRequest.images``. The worker checks and decodes them itself and
recomputes every hash from the bytes it received (nothing the router says about an image is
trusted).
"""

from __future__ import annotations

from collections.abc import Sequence

from llmserve.multimodal import ImageSpan, ImageTokens, expand_image_tokens, image_hash, image_spans
from router.errors import InvalidRequest


def check_takes_images(model: str, spec: ImageTokens | None, truncate: int | None) -> ImageTokens:
    """The image tokens of a model asked for a request with images; InvalidRequest when it takes
    none, or ``truncate_prompt_tokens`` is set (it could cut an image). Checked before a chat is
    rendered too: a text model's template cannot render image parts (its error would name no
    image)."""
    if spec is None:
        raise InvalidRequest(f"images: model {model!r} takes no images")
    if truncate is not None:
        raise InvalidRequest("truncate_prompt_tokens cannot be used with images (it could cut an image)")
    return spec


def expand_images(model: str, spec: ImageTokens | None, token_ids: Sequence[int], num_images: int,
                  field: str, truncate: int | None) -> list[int]:
    """``token_ids`` with one run of the model's image tokens per image; InvalidRequest as
    :func:`check_takes_images` says, or when the prompt's image tokens and the images do not match
    one to one."""
    spec = check_takes_images(model, spec, truncate if num_images else None)
    try:
        return expand_image_tokens(token_ids, spec, num_images)
    except ValueError as exc:
        raise InvalidRequest(f"{field}: {exc}") from None


def spans_of(spec: ImageTokens | None, token_ids: Sequence[int],
             images: Sequence[bytes]) -> tuple[ImageSpan, ...]:
    """The image spans of an expanded prompt (empty without images)."""
    if not images or spec is None:
        return ()
    try:
        return image_spans(token_ids, spec, [image_hash(data) for data in images])
    except ValueError as exc:  # expand_images made the runs: never for a prompt it passed
        raise InvalidRequest(f"images: {exc}") from None
