"""Sampler semantics on random logits, through the real RequestStates -> SamplingMetadata assembly."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from gpu_worker.core.types import ScheduledRequest
from gpu_worker.sampling_params import SamplingParams
from gpu_worker.worker.request_state import RequestStates
from gpu_worker.worker.sampler import Sampler, SamplerOutput
from gpu_worker.worker.sampling_metadata import build_sampling_metadata

V = 64
EOS = 2
CPU = torch.device("cpu")


def _states(items: Sequence[tuple[SamplingParams, list[int], list[int]]]) -> tuple[RequestStates, np.ndarray]:
    """Rows for (params, prompt, outputs so far); the next token is to be sampled."""
    states = RequestStates(
        max_num_seqs=8, max_blocks_per_seq=16, max_model_len=64, eos_token_ids=[EOS], device=CPU
    )
    rows = []
    for i, (params, prompt, output) in enumerate(items):
        tokens = prompt + output
        req = ScheduledRequest(
            req_id=f"r{i}",
            token_ids=tuple(tokens),
            start_pos=0,
            block_ids=(0,) * 8,
            sample=True,
            is_new=True,
            params=params,
            prompt_len=len(prompt),
            output_token_ids=tuple(output),
        )
        rows.append(states.update(req))
    return states, np.array(rows)


def _sample(
    logits: torch.Tensor, items: Sequence[tuple[SamplingParams, list[int], list[int]]], seed: int = 0
) -> SamplerOutput:
    states, rows = _states(items)
    md = build_sampling_metadata(states, rows, V, CPU)
    return Sampler(torch.Generator().manual_seed(seed)).sample(logits, md)


def _logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_top_k_1_equals_greedy() -> None:
    logits = _logits(6)
    greedy = _sample(logits, [(SamplingParams(temperature=0.0), [5], [])] * 6).token_ids
    topk1 = _sample(logits, [(SamplingParams(temperature=1.3, top_k=1), [5], [])] * 6).token_ids
    assert torch.equal(greedy, logits.argmax(-1))
    assert torch.equal(topk1, greedy)


def test_plain_greedy_takes_the_argmax_of_16_bit_logits_as_float32_would() -> None:
    """bf16 logits (what a bf16 model's LM head returns): a plain greedy step takes their argmax
    without the float32 copy, and gets the ids float32 logits give, ties (common in bf16: here
    every row's maximum occurs twice) resolved to the first index alike."""
    logits = (_logits(6, seed=3) * 0.25).round().bfloat16()
    first = logits.float().argmax(-1)
    assert (first < V - 1).all()
    logits[:, V - 1] = logits.max(dim=-1).values  # a tie with the earlier maximum on every row
    plain = [(SamplingParams(temperature=0.0), [5], [])] * 6
    states, rows = _states(plain)
    md = build_sampling_metadata(states, rows, V, CPU)
    assert md.plain_greedy
    out = Sampler(torch.Generator().manual_seed(0)).sample(logits, md)
    assert torch.equal(out.token_ids, logits.float().argmax(-1))
    assert torch.equal(out.token_ids, first) and out.logprobs is None
    # Anything that reads or changes the logits makes the step not plain: float32 throughout.
    for params in (SamplingParams(temperature=0.0, logprobs=2),
                   SamplingParams(temperature=0.0, logit_bias={9: 3.0}),
                   SamplingParams(temperature=0.0, repetition_penalty=1.3), SamplingParams(temperature=0.7)):
        states, rows = _states([(params, [5], [])] * 6)
        md = build_sampling_metadata(states, rows, V, CPU)
        assert not md.plain_greedy
        bf16 = _sample(logits, [(params, [5], [])] * 6, seed=1)
        f32 = _sample(logits.float(), [(params, [5], [])] * 6, seed=1)
        assert torch.equal(bf16.token_ids, f32.token_ids)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, max_tokens=3, stop_token_ids=[7], ignore_eos=True),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=0.0, logit_bias={9: 3.0}),
        SamplingParams(temperature=0.0, presence_penalty=0.5),
        SamplingParams(temperature=0.0, min_tokens=2),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=0.7, seed=3),
    ],
)
def test_the_plain_greedy_row_flag_agrees_with_the_metadata(params: SamplingParams) -> None:
    """``RequestStates.plain_greedy`` (the runner's shortcut past the metadata) is set for the
    rows whose metadata is plain greedy (a row with ``min_tokens`` never is, even once its
    minimum is out: a conservative choice), and the shortcut's ids are the sampler's."""
    states, rows = _states([(params, [5, 6], [])] * 3)
    md = build_sampling_metadata(states, rows, V, CPU)
    assert bool(states.plain_greedy[rows].all()) == md.plain_greedy
    logits = _logits(3, seed=4)
    if md.plain_greedy:
        sampled = _sample(logits, [(params, [5, 6], [])] * 3)
        assert torch.equal(Sampler(torch.Generator()).greedy(logits).token_ids, sampled.token_ids)


def test_plain_greedy_steps_take_the_samplers_argmax_and_other_steps_do_not() -> None:
    """A sampler given an ``argmax`` (CUDA: ``kernels.greedy_argmax``) takes it for plain greedy
    steps only; steps that change or read the logits first take torch's argmax of the result."""
    calls: list[int] = []

    def argmax(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x.argmax(dim=-1)

    sampler = Sampler(torch.Generator().manual_seed(0), argmax=argmax)
    greedy = [(SamplingParams(temperature=0.0), [5, 6], [])] * 3
    logits = _logits(3, seed=7)
    states, rows = _states(greedy)
    md = build_sampling_metadata(states, rows, V, CPU)
    assert md.plain_greedy
    assert torch.equal(sampler.sample(logits, md).token_ids, logits.argmax(dim=-1))
    assert calls == [3]
    penalized = [(SamplingParams(temperature=0.0, repetition_penalty=1.3), [5, 6], [])] * 3
    states, rows = _states(penalized)
    md = build_sampling_metadata(states, rows, V, CPU)
    assert not md.plain_greedy
    assert torch.equal(sampler.sample(logits, md).token_ids, _sample(logits, penalized).token_ids)
    assert calls == [3]


def test_mixed_greedy_and_random_rows() -> None:
    logits = _logits(4)
    items: list[tuple[SamplingParams, list[int], list[int]]] = [
        (SamplingParams(temperature=0.0), [1], []),
        (SamplingParams(temperature=1.0), [1], []),
    ] * 2
    out = _sample(logits, items).token_ids
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def test_seeded_sampling_is_reproducible_and_batch_independent() -> None:
    logits = _logits(5, seed=3)
    seeded = SamplingParams(temperature=1.0, seed=1234)
    other = SamplingParams(temperature=1.0)
    draws_alone, draws_batched = [], []
    for step in range(12):  # the output index changes the draw: a sequence of tokens, not one token
        out = [4] * step
        draws_alone.append(int(_sample(logits[2:3], [(seeded, [7], out)], seed=step).token_ids[0]))
        items = [(other, [1], []), (other, [9, 9], [3]), (seeded, [7], out), (other, [2], [])]
        batch = torch.cat([logits[:2], logits[2:3], logits[3:4]])
        draws_batched.append(int(_sample(batch, items, seed=100 + step).token_ids[2]))
    assert draws_alone == draws_batched
    assert len(set(draws_alone)) > 1  # really sampling, not argmax
    again = [int(_sample(logits[2:3], [(seeded, [7], [4] * s)], seed=99).token_ids[0]) for s in range(12)]
    assert again == draws_alone


def test_sampling_follows_the_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-1e9] * (V - 4)]).repeat(4000, 1)
    states, _ = _states([(SamplingParams(temperature=1.0), [1], [])])
    md = build_sampling_metadata(states, np.zeros(4000, dtype=np.int64), V, CPU)
    tokens = Sampler(torch.Generator().manual_seed(5)).sample(logits, md).token_ids
    freq = torch.bincount(tokens, minlength=V)[:4].float() / 4000
    expected = logits[0, :4].softmax(-1)
    torch.testing.assert_close(freq, expected, atol=0.03, rtol=0)


def test_seeded_rows_draw_nothing_from_the_batch_generator() -> None:
    """Each row's noise is drawn once: with every row seeded the batch generator is untouched."""
    generator = torch.Generator().manual_seed(0)
    before = generator.get_state()
    states, rows = _states([(SamplingParams(temperature=1.0, seed=s), [1], []) for s in (1, 2, 3)])
    md = build_sampling_metadata(states, rows, V, CPU)
    Sampler(generator).sample(_logits(3), md)
    assert torch.equal(generator.get_state(), before)


def test_unseeded_rows_next_to_seeded_ones_follow_the_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-1e9] * (V - 4)]).repeat(4000, 1)
    seeded = SamplingParams(temperature=1.0, seed=7)
    states, _ = _states([(seeded, [1], []), (SamplingParams(temperature=1.0), [1], [])])
    rows = np.ones(4000, dtype=np.int64)
    rows[::4] = 0  # every fourth row seeded
    md = build_sampling_metadata(states, rows, V, CPU)
    tokens = Sampler(torch.Generator().manual_seed(5)).sample(logits, md).token_ids
    unseeded = tokens[torch.from_numpy(rows == 1)]
    freq = torch.bincount(unseeded, minlength=V)[:4].float() / len(unseeded)
    torch.testing.assert_close(freq, logits[0, :4].softmax(-1), atol=0.03, rtol=0)


def test_top_p_and_min_p_restrict_the_support() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0, -0.5] + [-4.0] * (V - 4)])
    probs = logits.softmax(-1)[0]
    for params, allowed in [
        (SamplingParams(temperature=1.0, top_p=float(probs[0] + probs[1]) - 1e-3), {0, 1}),
        (SamplingParams(temperature=1.0, min_p=0.5), {0, 1}),
        (SamplingParams(temperature=1.0, top_k=3), {0, 1, 2}),
    ]:
        states, _ = _states([(params, [1], [])])
        md = build_sampling_metadata(states, np.zeros(500, dtype=np.int64), V, CPU)
        tokens = Sampler(torch.Generator().manual_seed(0)).sample(logits.repeat(500, 1), md).token_ids
        assert set(tokens.tolist()) == allowed


def test_logprobs_are_raw_log_softmax_with_rank() -> None:
    logits = _logits(3, seed=9)
    items = [
        (SamplingParams(temperature=1.0, logprobs=5, repetition_penalty=1.5), [1, 2], [3]),
        (SamplingParams(temperature=0.0), [1], []),
        (SamplingParams(temperature=0.0, logprobs=0, logit_bias={7: 50.0}), [1], []),
    ]
    out = _sample(logits, items)
    ref = torch.log_softmax(logits, -1)
    assert out.logprobs is not None
    logprobs = out.logprobs.to_host().to_list(out.token_ids.tolist())
    assert logprobs[1] is None
    for row in (0, 2):
        lp = logprobs[row]
        assert lp is not None
        tok = int(out.token_ids[row])
        assert lp.token_id == tok
        assert abs(lp.logprob - float(ref[row, tok])) < 1e-4
        assert lp.rank == int((ref[row] > ref[row, tok]).sum()) + 1
    top = logprobs[0].top  # type: ignore[union-attr]
    assert [t for t, _ in top] == ref[0].topk(5).indices.tolist()
    assert max(abs(v - float(ref[0, t])) for t, v in top) < 1e-4
    assert logprobs[2].top == () and int(out.token_ids[2]) == 7  # type: ignore[union-attr]


def test_penalties_and_logit_bias_match_the_formula() -> None:
    logits = _logits(2, seed=4)
    prompt, output = [5, 6, 6, 9], [9, 11, 11, 11]
    params = SamplingParams(
        temperature=0.0,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        repetition_penalty=1.7,
        logit_bias={13: 2.5, 5: -1.0},
    )
    states, rows = _states([(params, prompt, output), (SamplingParams(temperature=0.0), [1], [])])
    md = build_sampling_metadata(states, rows, V, CPU)
    got = Sampler.process(logits, md)

    expected = logits.clone()
    expected[0, 13] += 2.5
    expected[0, 5] -= 1.0
    for tok in set(prompt) | set(output):
        x = expected[0, tok]
        expected[0, tok] = x / 1.7 if x > 0 else x * 1.7
    for tok in set(output):
        expected[0, tok] -= 0.3 * output.count(tok) + 0.5
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("num_outputs,masked", [(0, True), (2, True), (3, False)])
def test_min_tokens_masks_eos_and_stop_ids(num_outputs: int, masked: bool) -> None:
    logits = torch.zeros(1, V)
    logits[0, EOS] = 10.0
    logits[0, 17] = 9.0
    logits[0, 20] = 8.0
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[17])
    out = _sample(logits, [(params, [1], [30] * num_outputs)])
    assert int(out.token_ids[0]) == (20 if masked else EOS)
    ignore = SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True)
    assert int(_sample(logits, [(ignore, [1], [])]).token_ids[0]) == EOS  # EOS is no stop: not masked
