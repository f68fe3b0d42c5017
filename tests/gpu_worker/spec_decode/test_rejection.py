"""Verification keeps the target distribution exactly (statistical, fixed seeds), greedy
verification is argmax matching, and the bookkeeping of accepted runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpu_worker.spec_decode.rejection import DraftLayout, count_accepted, rejection_sample, verify
from gpu_worker.worker.sampler import SamplingMetadata

V = 6
# Target distributions at positions 0..2 and the bonus position 3, and draft distributions that
# are far from them (a sampler that accepted every draft would be off by TV >= 0.3).
P = torch.tensor([
    [0.40, 0.25, 0.15, 0.10, 0.06, 0.04],
    [0.05, 0.10, 0.50, 0.05, 0.20, 0.10],
    [0.20, 0.20, 0.20, 0.20, 0.10, 0.10],
    [0.02, 0.08, 0.10, 0.30, 0.30, 0.20],
])
Q = torch.tensor([
    [0.05, 0.05, 0.10, 0.30, 0.30, 0.20],
    [0.40, 0.30, 0.05, 0.05, 0.10, 0.10],
    [0.60, 0.05, 0.05, 0.05, 0.05, 0.20],
])
K = 3
M = 120_000  # requests, each with K drafts


def tv(counts: np.ndarray, p: torch.Tensor) -> float:
    return 0.5 * float(np.abs(counts / counts.sum() - p.numpy()).sum())


def tv_bound(n: int) -> float:
    """About 3x the expected total variation of n samples from these distributions
    (E[TV] ~ 0.5 * sqrt(2 / (pi n)) * sum sqrt(p (1 - p)) ~ 0.9 / sqrt(n)), at least 0.01."""
    return max(0.01, 2.7 / n**0.5)


def emitted_by_position(drafts: np.ndarray, num_accepted: np.ndarray, final: np.ndarray) -> list[np.ndarray]:
    """Histogram of the token emitted at each position, over the requests that reached it."""
    out = []
    for j in range(K + 1):
        reached = num_accepted >= j
        tokens = np.where(num_accepted[reached] > j, drafts[reached, min(j, K - 1)], final[reached])
        out.append(np.bincount(tokens, minlength=V))
    return out


def layout_of(drafts: np.ndarray) -> DraftLayout:
    return DraftLayout(np.full(len(drafts), K, dtype=np.int64), drafts)


def test_power_of_the_check() -> None:
    """Accepting every draft would emit Q, which the bound below tells apart from P."""
    assert all(tv(Q[j].numpy() * 1000, P[j]) > 0.3 for j in range(K))


def test_rejection_sampling_with_draft_probabilities_keeps_the_target_distribution() -> None:
    """Drafts drawn from q, accepted with min(1, p/q), residual max(0, p - q): every emitted
    position is distributed as p."""
    g = torch.Generator().manual_seed(1234)
    drafts = torch.stack([torch.multinomial(Q[j], M, replacement=True, generator=g) for j in range(K)], dim=1)
    layout = layout_of(drafts.numpy())
    rows = layout.num_rows
    target = P.repeat(M, 1)  # row j of each request: P[j]
    draft_probs = torch.cat([Q, torch.zeros(1, V)]).repeat(M, 1)
    accepted, recovered = rejection_sample(
        target, torch.from_numpy(layout.row_drafts), torch.rand(rows, generator=g),
        torch.empty(rows, V).exponential_(generator=g), draft_probs,
    )
    num_accepted = count_accepted(accepted, layout)
    final = recovered[torch.from_numpy(layout.first_row) + num_accepted]
    hist = emitted_by_position(drafts.numpy(), num_accepted.numpy(), final.numpy())
    for j in range(K + 1):
        assert hist[j].sum() > 5_000, j
        assert tv(hist[j], P[j]) < tv_bound(hist[j].sum()), (j, hist[j] / hist[j].sum())
    # Acceptance at position 0 is sum(min(p, q)).
    assert float((num_accepted >= 1).double().mean()) == pytest.approx(float(torch.minimum(P[0], Q[0]).sum()),
                                                                      abs=0.01)


def test_verify_with_deterministic_drafts_keeps_the_target_distribution() -> None:
    """The engine's path (q one-hot at the draft, as n-gram and greedy draft models propose):
    accept x with probability p(x), else draw from p without x; drafts chosen by anything."""
    g = torch.Generator().manual_seed(99)
    mix = 0.5 * (P[:K] + Q)  # drafts from a guess half-way between (TV from P >= 0.15)
    n = 3 * M
    drafts = torch.stack(
        [torch.multinomial(mix[j], n, replacement=True, generator=g) for j in range(K)], dim=1
    )
    layout = layout_of(drafts.numpy())
    logits = P.log().repeat(n, 1)
    md = SamplingMetadata(all_greedy=False, greedy_mask=None, temperature=torch.ones(layout.num_rows),
                          top_k=None, top_p=None, min_p=None)
    result = verify(logits, md, layout, g)
    hist = emitted_by_position(drafts.numpy(), result.num_accepted.numpy(), result.final_ids.numpy())
    for j in range(K + 1):
        assert hist[j].sum() > 2_000, j
        assert tv(hist[j], P[j]) < tv_bound(hist[j].sum()), (j, hist[j] / hist[j].sum())
    assert tv(mix[0].numpy() * 1000, P[0]) > 5 * tv_bound(n)  # accepting every draft would fail
    # One-hot q: draft x at position 0 is accepted with probability p(x).
    expected = float((P[0] * mix[0]).sum())
    assert float((result.num_accepted >= 1).double().mean()) == pytest.approx(expected, abs=0.005)
    # row_tokens: the accepted drafts, then the final token.
    rows = result.row_tokens.view(n, K + 1)
    a = result.num_accepted
    assert torch.equal(rows[torch.arange(n), a], result.final_ids)
    assert all(torch.equal(rows[i, : a[i]], drafts[i, : a[i]]) for i in range(50))


def test_greedy_verification_is_argmax_matching() -> None:
    logits = torch.tensor([
        [0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0], [1.0, 2.0, 0.0],  # request 0: 3 drafts
        [2.0, 1.0, 0.0],  # request 1: no drafts (a plain decode in the same step)
        [0.0, 1.0, 4.0], [7.0, 0.0, 0.0],  # request 2: 1 draft
    ])
    layout = DraftLayout(np.array([3, 0, 1]), np.array([[1, 0, 1], [-1, -1, -1], [2, -1, -1]]))
    md = SamplingMetadata(
        all_greedy=True, greedy_mask=None, temperature=None, top_k=None, top_p=None, min_p=None
    )
    result = verify(logits, md, layout, torch.Generator())
    # request 0: drafts 1, 0 match the argmax, draft 1 at row 2 does not (argmax 2): 2 accepted, then 2
    assert result.num_accepted.tolist() == [2, 0, 1]
    assert result.final_ids.tolist() == [2, 0, 0]


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    """A seeded row's draws come from its own seed: the same result alone or among others."""
    logits = P.log()
    md = SamplingMetadata(all_greedy=False, greedy_mask=None, temperature=torch.ones(4), top_k=None,
                          top_p=None, min_p=None)
    layout = DraftLayout(np.array([3]), np.array([[3, 2, 1]]))
    alone = verify(logits, md, layout, torch.Generator().manual_seed(1), [(j, 100 + j) for j in range(4)])
    md2 = SamplingMetadata(all_greedy=False, greedy_mask=None, temperature=torch.ones(6), top_k=None,
                           top_p=None, min_p=None)
    batched_layout = DraftLayout(np.array([1, 3]), np.array([[4, -1, -1], [3, 2, 1]]))
    batched = verify(torch.cat([P[:2].log(), logits]), md2, batched_layout, torch.Generator().manual_seed(2),
                     [(2 + j, 100 + j) for j in range(4)])
    assert batched.num_accepted[1] == alone.num_accepted[0]
    assert batched.final_ids[1] == alone.final_ids[0]


def _random_md(rows: int) -> SamplingMetadata:
    return SamplingMetadata(all_greedy=False, greedy_mask=None, temperature=torch.ones(rows), top_k=None,
                            top_p=None, min_p=None)


def test_seeded_rows_draw_nothing_from_the_batch_generator() -> None:
    """Each row's noise and uniform are drawn once: with every row seeded the batch generator is
    untouched."""
    generator = torch.Generator().manual_seed(0)
    before = generator.get_state()
    layout = DraftLayout(np.array([3, 0]), np.array([[3, 2, 1], [-1, -1, -1]]))
    verify(torch.cat([P, P[:1]]).log(), _random_md(5), layout, generator, [(j, 100 + j) for j in range(5)])
    assert torch.equal(generator.get_state(), before)


def test_a_seeded_row_draws_its_noise_then_its_uniform_from_its_seed() -> None:
    """The documented draws: a generator seeded with the row's draw seed gives the row's ``Exp(1)``
    noise, then its uniform; the unseeded rows around it do not change them."""
    layout = DraftLayout(np.array([1, 1, 1]), np.array([[2], [0], [4]]))
    logits = torch.cat([P[:2], P[:2], P[:2]]).log()
    seeded_rows = [(2, 21), (3, 22)]  # the middle request
    result = verify(logits, _random_md(6), layout, torch.Generator().manual_seed(3), seeded_rows)
    noise, uniform = torch.empty(2, V), torch.empty(2)
    for i, (_, seed) in enumerate(seeded_rows):
        row_generator = torch.Generator().manual_seed(seed)
        noise[i].exponential_(generator=row_generator)
        uniform[i] = torch.rand((), generator=row_generator)
    accepted, recovered = rejection_sample(P[:2], torch.tensor([0, -1]), uniform, noise)
    expected_accepted = int(accepted[0])
    assert result.num_accepted[1] == expected_accepted
    assert result.final_ids[1] == recovered[expected_accepted]


def test_unseeded_rows_next_to_seeded_ones_keep_the_target_distribution() -> None:
    """Every other request seeded: the unseeded requests' emitted tokens are still distributed as p."""
    g = torch.Generator().manual_seed(17)
    n = 16_000
    mix = 0.5 * (P[:K] + Q)
    drafts = torch.stack([torch.multinomial(mix[j], n, replacement=True, generator=g) for j in range(K)],
                         dim=1)
    layout = layout_of(drafts.numpy())
    seeded_rows = [(int(layout.first_row[i]) + j, 1000 * i + j) for i in range(0, n, 2) for j in range(K + 1)]
    result = verify(P.log().repeat(n, 1), _random_md(layout.num_rows), layout, g, seeded_rows)
    unseeded = slice(1, None, 2)
    hist = emitted_by_position(
        drafts.numpy()[unseeded], result.num_accepted.numpy()[unseeded], result.final_ids.numpy()[unseeded]
    )
    for j in range(2):  # the positions enough unseeded requests reach for a sharp check
        assert hist[j].sum() > 1_000, j
        assert tv(hist[j], P[j]) < tv_bound(hist[j].sum()), (j, hist[j] / hist[j].sum())
    assert tv(mix[0].numpy() * 1000, P[0]) > 5 * tv_bound(hist[0].sum())  # accepting every draft would fail


def test_count_accepted_stops_at_the_first_rejection() -> None:
    layout = DraftLayout(np.array([3, 0, 2]), np.array([[5, 5, 5], [-1, -1, -1], [5, 5, -1]]))
    accepted = torch.tensor([True, False, True, False, False, True, True, False])
    assert count_accepted(accepted, layout).tolist() == [1, 0, 2]
    assert layout.row_drafts.tolist() == [5, 5, 5, -1, -1, 5, 5, -1]
