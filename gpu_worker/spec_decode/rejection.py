"""Verifying drafts in one target step: accept the longest prefix the target agrees with, then
take one more token from the target (the correction at the first rejection, or a bonus token
after the last draft).

Each sampled request with ``d`` drafts has ``d + 1`` logits rows: row ``j`` is the target's
distribution of the token at the position of draft ``j`` (row ``d``: the token after the last
draft), computed as plain decoding would compute it had drafts ``0 .. j-1`` been sampled.

* Greedy rows: draft ``j`` is accepted when it is the argmax of row ``j``; the token after the
  accepted run is the argmax at that row. Output equals plain greedy decoding, token for token.
* Random rows: rejection sampling (Leviathan et al. 2023; Chen et al. 2023), which keeps the
  target distribution ``p`` exactly: draft ``x`` drawn from ``q`` is accepted with probability
  ``min(1, p(x) / q(x))``; at the first rejection the token is drawn from the residual
  ``max(0, p - q)`` renormalized; after ``d`` acceptances a bonus token is drawn from ``p``. Our
  proposers draft deterministically (n-gram lookup, a draft model's argmax), so ``q`` is one-hot:
  accept ``x`` with probability ``p(x)``, else draw from ``p`` without ``x``. Draws use the
  exponential race (``argmax(w / E)``, ``E ~ Exp(1)``: a sample proportional to ``w``, no
  normalization), as the sampler does.

Seeded requests draw each row's noise, then its uniform, from a generator seeded with
``seed_for_draw(seed, output index of that row's token)``: reproducible whatever the batch and
whatever was accepted before; a row without a draft is then sampled exactly as plain decoding
samples it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from gpu_worker.worker.sampler import Sampler, SamplingMetadata, draw_by_row, exponential_, uniform_


@dataclass(frozen=True)
class DraftLayout:
    """Where a step's sampled requests' verified positions are among its logits rows."""

    num_drafts: np.ndarray  # [N] int64
    draft_ids: np.ndarray  # [N, max drafts] int64, -1 padding

    @functools.cached_property
    def first_row(self) -> np.ndarray:
        """[N] each request's first logits row."""
        counts = self.num_drafts + 1
        return np.cumsum(counts) - counts  # type: ignore[no-any-return]

    @property
    def num_rows(self) -> int:
        return int(self.num_drafts.sum()) + len(self.num_drafts)

    @functools.cached_property
    def row_request(self) -> np.ndarray:
        """[R] the request of each row."""
        return np.repeat(np.arange(len(self.num_drafts)), self.num_drafts + 1)

    @functools.cached_property
    def row_offset(self) -> np.ndarray:
        """[R] the row's position among its request's rows (0 .. drafts)."""
        return np.arange(self.num_rows) - self.first_row[self.row_request]  # type: ignore[no-any-return]

    @functools.cached_property
    def row_drafts(self) -> np.ndarray:
        """[R] the draft each row verifies; -1 on a request's last row (the bonus position)."""
        padded = np.concatenate([self.draft_ids, np.full((len(self.num_drafts), 1), -1, np.int64)], axis=1)
        return padded[self.row_request, self.row_offset]  # type: ignore[no-any-return]


class VerifyResult(NamedTuple):
    """Device tensors of one verification."""

    num_accepted: torch.Tensor  # [N] int64: drafts accepted per request
    final_ids: torch.Tensor  # [N] int64: the target's token after the accepted drafts
    row_tokens: torch.Tensor  # [R] int64: the token emitted at each row (junk past a request's end)


def rejection_sample(
    target_probs: torch.Tensor,
    row_drafts: torch.Tensor,
    uniform: torch.Tensor,
    noise: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row by row: is the row's draft accepted, and the token drawn if it is not.

    ``target_probs`` ``[R, V]`` (``p``); ``row_drafts`` ``[R]`` (-1: no draft, draw from ``p``);
    ``uniform`` ``[R]`` in [0, 1) and ``noise`` ``[R, V]`` ``Exp(1)`` draws; ``draft_probs``
    ``[R, V]`` (``q``; None: one-hot at the draft). Returns ``(accepted [R] bool, recovered [R])``.
    """
    has_draft = row_drafts >= 0
    index = row_drafts.clamp(min=0)[:, None]
    p_x = target_probs.gather(1, index)[:, 0]
    if draft_probs is None:
        accepted = has_draft & (uniform < p_x)
        residual = target_probs.scatter(1, index, 0.0)
    else:
        q_x = draft_probs.gather(1, index)[:, 0]
        accepted = has_draft & (uniform * q_x < p_x)  # u < min(1, p/q), without dividing
        residual = (target_probs - draft_probs).clamp(min=0.0)
    residual = torch.where(has_draft[:, None], residual, target_probs)
    # A residual of zeros (p == q) goes with an acceptance probability of 1: never drawn from.
    recovered = residual.div(noise).argmax(dim=-1)
    return accepted, recovered


def count_accepted(accepted: torch.Tensor, layout: DraftLayout) -> torch.Tensor:
    """[N] length of each request's run of accepted rows (a request's last row never is)."""
    width = int(layout.num_drafts.max()) + 1
    rows = layout.first_row[:, None] + np.minimum(np.arange(width)[None, :], layout.num_drafts[:, None])
    runs = accepted[torch.from_numpy(rows).to(accepted.device)]
    return runs.to(torch.int64).cumprod(dim=1).sum(dim=1)


def verify(
    logits: torch.Tensor,
    md: SamplingMetadata,
    layout: DraftLayout,
    generator: torch.Generator,
    seeded_rows: Sequence[tuple[int, int]] = (),
) -> VerifyResult:
    """Verify a step's drafts. ``logits`` ``[R, V]``: the model's, one row per verified position;
    ``md``: the sampling settings of those rows; ``generator`` draws for unseeded rows;
    ``seeded_rows``: ``(row, draw seed)`` of seeded random rows (see the module docstring)."""
    device = logits.device
    processed = Sampler.process(logits, md)
    row_drafts = torch.from_numpy(layout.row_drafts).to(device)
    if md.all_greedy:
        recovered = processed.argmax(dim=-1)
        accepted = recovered == row_drafts
    else:
        probs = Sampler.probs(processed, md)
        # Each row's generator draws its noise, then its uniform (one generator per seeded row).
        seeded = [(row, torch.Generator(device=device).manual_seed(seed)) for row, seed in seeded_rows]
        noise = draw_by_row(torch.empty_like(probs), generator, seeded, exponential_)
        uniform = draw_by_row(torch.empty(len(probs), device=device), generator, seeded, uniform_)
        accepted, recovered = rejection_sample(probs, row_drafts, uniform, noise)
        if md.greedy_mask is not None:
            argmax = processed.argmax(dim=-1)
            accepted = torch.where(md.greedy_mask, argmax == row_drafts, accepted)
            recovered = torch.where(md.greedy_mask, argmax, recovered)
    num_accepted = count_accepted(accepted, layout)
    first_row = torch.from_numpy(layout.first_row).to(device)
    final_ids = recovered[first_row + num_accepted]
    row_offset = torch.from_numpy(layout.row_offset).to(device)
    row_request = torch.from_numpy(layout.row_request).to(device)
    row_tokens = torch.where(row_offset < num_accepted[row_request], row_drafts, recovered)
    return VerifyResult(num_accepted, final_ids, row_tokens)
