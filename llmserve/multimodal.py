"""Images in a prompt, as router, worker and offline API see them (torch-free: the router imports it).

A model that takes images (LLaVA) marks each image in its prompt with a run of
``ImageTokens.per_image`` copies of its image token; the model replaces those positions' embeddings
with the image's features. A caller writes the token once per image (LLaVA's ``"<image>"``);
:func:`expand_image_tokens` makes the runs. Each image is known by :func:`image_hash` of its encoded
bytes: the hash joins the hash of every KV block the image's run overlaps
(:func:`llmserve.hashing.block_hashes`), so two prompts share cached blocks only where their text
*and* their images agree, on the worker and in the router's prefix routing alike.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# The file a worker adds to its tokenizer files (WorkerControl.GetTokenizer) when its model takes
# images: the router expands image tokens as the worker does.
IMAGE_TOKENS_FILE = "llmserve_image_tokens.json"
_HASH_BYTES = 16


def image_hash(data: bytes) -> bytes:
    """The identity of an image: BLAKE2b of its encoded bytes (the same file, the same hash on every
    host; the same picture re-encoded is another image to the cache)."""
    return hashlib.blake2b(data, digest_size=_HASH_BYTES, person=b"llmserve-image").digest()


@dataclass(frozen=True)
class ImageTokens:
    """How a model marks an image in its prompt: ``per_image`` copies of ``token_id`` (``token``
    its text, as a caller writes it)."""

    token_id: int
    per_image: int
    token: str = "<image>"

    def to_json(self) -> bytes:
        record = {"token_id": self.token_id, "per_image": self.per_image, "token": self.token}
        return json.dumps(record).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ImageTokens:
        """The record :meth:`to_json` wrote; ``ValueError`` for anything else (it comes over the
        network from a worker)."""
        try:
            raw: Any = json.loads(data)
            token_id, per_image, token = raw["token_id"], raw["per_image"], raw["token"]
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"bad {IMAGE_TOKENS_FILE}: {exc}") from None
        if not (isinstance(token_id, int) and isinstance(per_image, int) and isinstance(token, str)
                and 0 <= token_id < 2**31 and 1 <= per_image <= 1 << 16):
            raise ValueError(f"bad {IMAGE_TOKENS_FILE}: {raw!r:.200}")
        return cls(token_id, per_image, token)


@dataclass(frozen=True)
class ImageSpan:
    """One image's run of placeholder tokens in a prompt: positions ``offset .. offset + length -
    1``; ``hash`` is :func:`image_hash` of the image."""

    offset: int
    length: int
    hash: bytes

    @property
    def end(self) -> int:
        return self.offset + self.length


def expand_image_tokens(token_ids: Sequence[int], spec: ImageTokens, num_images: int) -> list[int]:
    """``token_ids`` with one run of ``spec.per_image`` image tokens per image.

    A prompt may write the image token once per image (each becomes a run) or hold the runs
    already (the router expands before it sends; ``per_image`` copies per image in all). Any
    other count is a ``ValueError`` naming both counts: the images and their placeholders must
    match one to one."""
    count = sum(1 for t in token_ids if t == spec.token_id)
    if count == num_images * spec.per_image:
        image_spans(token_ids, spec, [b""] * num_images)  # the runs must be whole
        return list(token_ids)
    if count != num_images:
        raise ValueError(f"the prompt has {count} image tokens ({spec.token!r}) for {num_images} image(s): "
                         f"write {spec.token!r} once per image")
    out: list[int] = []
    for t in token_ids:
        if t == spec.token_id:
            out.extend([t] * spec.per_image)
        else:
            out.append(t)
    return out


def image_spans(token_ids: Sequence[int], spec: ImageTokens,
                hashes: Sequence[bytes]) -> tuple[ImageSpan, ...]:
    """The span of each image in an expanded prompt, in order (``hashes[i]`` is image ``i``'s);
    ``ValueError`` unless the image tokens form exactly ``len(hashes)`` runs of ``per_image`` (a
    longer run is several images back to back)."""
    spans: list[ImageSpan] = []
    i, n = 0, len(token_ids)
    while i < n:
        if token_ids[i] != spec.token_id:
            i += 1
            continue
        j = i
        while j < n and token_ids[j] == spec.token_id:
            j += 1
        run = j - i
        if run % spec.per_image:
            raise ValueError(f"a run of {run} image tokens at position {i} is not whole images of "
                             f"{spec.per_image} tokens")
        for k in range(run // spec.per_image):
            if len(spans) == len(hashes):
                raise ValueError(f"the prompt has more image placeholders than its {len(hashes)} image(s)")
            spans.append(ImageSpan(i + k * spec.per_image, spec.per_image, hashes[len(spans)]))
        i = j
    if len(spans) != len(hashes):
        raise ValueError(f"the prompt has {len(spans)} image placeholder(s) for {len(hashes)} image(s)")
    return tuple(spans)


def decode_data_url(url: str, field: str, max_bytes: int | None = None) -> bytes:
    """The bytes of a ``data:[<type>];base64,<payload>`` URL; ``ValueError`` naming ``field`` for
    any other URL (nothing is fetched: no ``http(s):`` or ``file:``) or a payload that is not
    base64. ``max_bytes`` bounds the payload before it is decoded."""
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0][:16] if ":" in url else "no scheme"
        raise ValueError(f"{field}: only data: URLs (data:image/png;base64,...) are served; nothing is "
                         f"fetched ({scheme!r} URL)")
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise ValueError(f"{field}: a data URL must be base64 (data:image/png;base64,...)")
    if max_bytes is not None and len(payload) * 3 // 4 > max_bytes:
        raise ValueError(f"{field}: the image is over {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{field}: the data URL's payload is not valid base64") from None
