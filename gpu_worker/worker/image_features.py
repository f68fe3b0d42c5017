"""The runner's images: each live request's images, and the step's input embeddings with their
features in place of the placeholder tokens.

A request's images come with its first schedule (``ScheduledRequest.images``). A step whose tokens
overlap an image's span runs the vision tower on that image (every image the step needs at once,
batched by pixel shape) and gives the model input embeddings: the token embeddings, with each
overlapped position's row replaced by the image feature of that position. A span may be split
across prefill chunks, or begin inside a prefix-cache hit: the features of an image are kept
until the step that computes its span's last position, then dropped, and a request past its last
image is forgotten (its decode steps cost nothing here); a request preempted and resumed comes
back with its images and runs the tower again. Steps without image positions use the token ids as before (and
their CUDA graphs); steps with them run eagerly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gpu_worker.core.types import ImageInput, SchedulerOutput


@dataclass(frozen=True)
class _Piece:
    """Positions ``row .. row + (end - begin) - 1`` of the flat batch take rows ``begin .. end - 1``
    of image ``index`` of request ``req_id``."""

    req_id: str
    index: int
    row: int
    begin: int
    end: int
    last: bool  # the step computes the span's last position: its features go after it


class ImageFeatures:
    """Images of the requests a runner holds (only for a model with ``embed_images``)."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, first_stage: bool) -> None:
        self._model = model
        self._device = device
        self._dtype = dtype
        self._first_stage = first_stage  # only the first pipeline stage embeds its input
        self._images: dict[str, tuple[ImageInput, ...]] = {}
        self._features: dict[tuple[str, int], torch.Tensor] = {}

    def remove(self, req_id: str) -> None:
        """Forget a finished or preempted request (its cached features too)."""
        images = self._images.pop(req_id, ())
        for k in range(len(images)):
            self._features.pop((req_id, k), None)

    def plan(self, sched: SchedulerOutput) -> list[_Piece]:
        """Register the step's new requests' images; the image pieces its tokens hold (empty: a
        step of text tokens only, which may replay graphs)."""
        requests = sched.requests
        columns = sched.step_columns()
        for i in columns.changed:  # new requests are among the records read whole
            r = requests[i]
            if r.is_new:
                self.remove(r.req_id)  # resumed after a preemption: its features are gone anyway
                if r.images:
                    self._images[r.req_id] = r.images
        pieces: list[_Piece] = []
        if not self._images:  # no live request has images: nothing to look for
            return pieces
        row = 0
        for r, n in zip(requests, columns.num_tokens, strict=True):
            images = self._images.get(r.req_id)
            if images:
                begin, end = r.start_pos, r.start_pos + n
                for k, image in enumerate(images):
                    span = image.span
                    lo, hi = max(begin, span.offset), min(end, span.end)
                    if lo < hi:
                        pieces.append(_Piece(r.req_id, k, row + lo - begin, lo - span.offset,
                                             hi - span.offset, hi == span.end))
            row += n
        return pieces

    @torch.inference_mode()
    def embeds(self, pieces: Sequence[_Piece], input_ids: torch.Tensor) -> torch.Tensor | None:
        """The step's input embeddings ``[T, H]`` with the pieces' image features in place (None
        on a pipeline stage after the first, which takes the previous stage's activations)."""
        embeds: torch.Tensor | None = None
        if self._first_stage:
            self._encode([p for p in pieces if (p.req_id, p.index) not in self._features])
            embeds = self._model.embed_input_ids(input_ids)  # type: ignore[operator]
            for p in pieces:
                key = (p.req_id, p.index)
                features = self._features[key]
                embeds[p.row : p.row + p.end - p.begin] = features[p.begin : p.end]
                if p.last:
                    del self._features[key]
        for p in pieces:  # a request past its last image decodes text only: forget its images
            if p.last and p.index == len(self._images[p.req_id]) - 1:
                self.remove(p.req_id)
        return embeds

    def _encode(self, pieces: Sequence[_Piece]) -> None:
        """Run the vision tower on the pieces' images (once each; one call per pixel shape)."""
        by_shape: dict[tuple[int, ...], list[tuple[str, int]]] = {}
        for p in pieces:
            key = (p.req_id, p.index)
            pixels = self._images[p.req_id][p.index].pixel_values
            keys = by_shape.setdefault(tuple(pixels.shape), [])
            if key not in keys:
                keys.append(key)
        for keys in by_shape.values():
            pixels = torch.stack([torch.as_tensor(self._images[r][k].pixel_values) for r, k in keys])
            features = self._model.embed_images(  # type: ignore[operator]
                pixels.to(self._device, self._dtype, non_blocking=True))
            for key, feature in zip(keys, features, strict=True):
                span = self._images[key[0]][key[1]].span
                if feature.shape[0] != span.length:
                    raise RuntimeError(f"request {key[0]}: image {key[1]} has {feature.shape[0]} features "
                                       f"for a span of {span.length} tokens")
                self._features[key] = feature
