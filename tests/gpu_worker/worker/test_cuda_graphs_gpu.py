"""On a GPU, with real-shaped random models (bf16): decode CUDA graphs and the mixed steps'
piecewise graphs (prefill chunks beside a decode) give the eager results, and the Triton kernels
give the torch-reference results, for the first generated tokens.

Both comparisons run two runners in lockstep on identical scheduler outputs and feed both
the first runner's tokens (teacher forcing), so one near-tie cannot make the sequences, and
everything compared after it, diverge.

Tolerance, reasoned: activations and weights are bf16 (unit roundoff 2^-9, about 0.2%). The
two paths differ in accumulation order (and, for the references, in attention precision and
in separate vs fused norm/rotary kernels), so each sublayer output differs by a few units of
roundoff relative to its size; over two layers and about ten such ops the final hidden state,
and with it the logits (a 2k-4k-term dot product of it), differ by ~1-2% of their spread. We
allow a relative norm of 3e-2 on the logits. Random weights give flat logits (the top-2
margin of 128k near-Gaussian logits is often under 0.1 while the paths differ by ~0.01 per
logit), so a token may differ only at a near-tie: the other path's pick trails this path's
pick by less than 6 x the RMS logit difference of that row; and at least 85% of the tokens
must be equal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from gpu_worker.config import EngineConfig
from gpu_worker.core.types import ScheduledRequest, SchedulerOutput
from gpu_worker.model_executor import loader
from gpu_worker.model_executor.layers.rotary import RotaryEmbedding
from gpu_worker.model_executor.models.registry import resolve_model_class
from gpu_worker.model_executor.weights import fill_random
from gpu_worker.sampling_params import SamplingParams
from gpu_worker.worker.model_runner import ModelRunner
from kernels import reference_ops
from kernels.triton_ops.pdl import pdl_supported
from tests.helpers.runners import build_runner

pytestmark = pytest.mark.gpu

BLOCK = 16
NUM_BLOCKS = 128
MAX_LEN = 512

# Two layers of the real shapes (the width, heads and vocabulary decide the kernels' tiles).
SHAPES = {
    "llama3-1b": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=64),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128),
}


def _write_config(path: Path, shape: dict[str, int]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=2, vocab_size=128256,
        rope_theta=500000.0, max_position_embeddings=MAX_LEN, rms_norm_eps=1e-5,
        tie_word_embeddings=False, torch_dtype="bfloat16", hidden_act="silu", **shape,
    )
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _runner(path: Path, *, eager: bool, reference: bool = False, pdl: bool = True) -> ModelRunner:
    engine_args: dict[str, Any] = dict(
        load_format="dummy", block_size=BLOCK, max_model_len=MAX_LEN, max_num_seqs=8, enforce_eager=eager,
        enable_pdl=pdl,
    )
    config = EngineConfig(model=str(path), num_kv_blocks=NUM_BLOCKS, **engine_args)
    source = loader.resolve_model(config.model)
    hf_config = loader.load_hf_config(source)
    dev = torch.device("cuda")
    if reference:  # same weights (fill_random seeds per parameter name), torch-reference ops
        cls = resolve_model_class(hf_config.architectures)
        with torch.device(dev):
            model = cls(hf_config, reference_ops(), torch.bfloat16)  # type: ignore[call-arg]
        for module in model.modules():
            if isinstance(module, RotaryEmbedding):
                module.reset_cache(dev)
        fill_random(model, config.seed)
        model.requires_grad_(False).eval()
    else:
        model = loader.load_model(config, dev, torch.bfloat16, source=source, hf_config=hf_config)
    runner = build_runner(path, dev, torch.bfloat16, NUM_BLOCKS, model=model, **engine_args)
    runner.warmup()
    return runner


def _lockstep(runners: list[ModelRunner], spies: list[list[torch.Tensor]], prompts: list[list[int]],
              steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prefill all prompts, then decode ``steps`` tokens; returns (logits_a, logits_b) per step."""
    params = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
    next_block = 1
    tables: list[list[int]] = []
    for p in prompts:
        n = -(-(len(p) + steps + 1) // BLOCK)
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    assert next_block <= NUM_BLOCKS
    seqs = [list(p) for p in prompts]
    pairs = []
    for step in range(steps + 1):
        reqs = []
        for i, (p, seq) in enumerate(zip(prompts, seqs, strict=True)):
            new = step == 0
            reqs.append(ScheduledRequest(
                req_id=f"r{i}", token_ids=tuple(seq) if new else (seq[-1],),
                start_pos=0 if new else len(seq) - 1, block_ids=tuple(tables[i]) if new else (),
                sample=True, is_new=new, params=params if new else None, prompt_len=len(p),
            ))
        num_tokens = sum(len(r.token_ids) for r in reqs)
        sched = SchedulerOutput(requests=tuple(reqs), num_scheduled_tokens=num_tokens)
        outs = [r.execute(sched) for r in runners]
        pairs.append((spies[0][-1].float(), spies[1][-1].float()))
        for seq, tok in zip(seqs, outs[0].sampled_token_ids, strict=True):
            seq.append(tok)
    return pairs


def _check(pairs: list[tuple[torch.Tensor, torch.Tensor]], rel_tol: float) -> None:
    equal = total = 0
    for a, b in pairs:
        rel = (a - b).norm() / a.norm()
        assert rel < rel_tol, f"logits differ by {rel:.2e} (relative norm)"
        picked_a, picked_b = a.argmax(-1), b.argmax(-1)
        # A different pick is a near-tie: in ``a`` it trails ``a``'s pick by less than the
        # rounding noise between the paths (6 x the row's RMS logit difference).
        gap = a.gather(1, picked_a[:, None]) - a.gather(1, picked_b[:, None])
        noise = (a - b).pow(2).mean(dim=-1, keepdim=True).sqrt()
        differ = picked_a != picked_b
        assert bool((gap[differ] <= 6 * noise[differ]).all()), "a token differs beyond a near-tie"
        equal += int((~differ).sum())
        total += a.shape[0]
    assert equal >= 0.85 * total, f"only {equal}/{total} tokens equal"


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 37, 64, 100, 16, 130, 1, 250][:n]
    return [torch.randint(1, 128000, (k,), generator=g).tolist() for k in lengths]


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_decode_graphs_match_eager(tmp_path: Path, shape: str, logits_spy: Any) -> None:
    path = _write_config(tmp_path / shape, SHAPES[shape])
    graphed, eager = _runner(path, eager=False), _runner(path, eager=True)
    assert graphed.graphs is not None and graphed.graphs.captured and eager.graphs is None
    replays = []
    original = graphed.graphs.replay

    def counting_replay(size: int) -> torch.Tensor:
        replays.append(size)
        return original(size)

    graphed.graphs.replay = counting_replay  # type: ignore[method-assign]
    for n in (4, 3, 8):  # a bucket's exact size, a padded batch (3 -> 4), the largest bucket
        spies = [logits_spy(graphed), logits_spy(eager)]
        _check(_lockstep([graphed, eager], spies, _prompts(n, n), steps=24), rel_tol=1e-2)
        graphed.execute(SchedulerOutput((), 0, finished_req_ids=frozenset(f"r{i}" for i in range(n))))
        eager.execute(SchedulerOutput((), 0, finished_req_ids=frozenset(f"r{i}" for i in range(n))))
    assert replays == [4] * 24 + [4] * 24 + [8] * 24  # every decode step replayed a graph


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_triton_path_matches_torch_reference(tmp_path: Path, shape: str, logits_spy: Any) -> None:
    path = _write_config(tmp_path / shape, SHAPES[shape])
    triton_runner = _runner(path, eager=False)
    ref_runner = _runner(path, eager=True, reference=True)
    attn: Any = triton_runner.model.model.layers[0].self_attn.attn  # type: ignore[union-attr,index]
    assert attn.ops.name != "reference"
    spies = [logits_spy(ref_runner), logits_spy(triton_runner)]
    _check(_lockstep([ref_runner, triton_runner], spies, _prompts(4, 7), steps=8), rel_tol=3e-2)


@pytest.mark.skipif(not pdl_supported("cuda"), reason="programmatic dependent launch needs sm_90+")
def test_pdl_runner_gives_the_bits_of_plain_launches(tmp_path: Path, logits_spy: Any) -> None:
    """``enable_pdl`` (the default) against ``enable_pdl=False``: decode graphs at batch 1 (the
    one-token GEMVs) and at 4, the same logits bit for bit at every step."""
    path = _write_config(tmp_path / "llama3-8b", SHAPES["llama3-8b"])
    chained, plain = _runner(path, eager=False), _runner(path, eager=False, pdl=False)
    linear16 = chained.model.model.layers[0].self_attn.attn.ops.linear16  # type: ignore[union-attr,index]
    assert linear16.keywords == {"pdl": True}
    for n in (1, 4):
        spies = [logits_spy(chained), logits_spy(plain)]
        for a, b in _lockstep([chained, plain], spies, _prompts(n, 20 + n), steps=12):
            assert torch.equal(a, b), f"batch {n}: logits differ with PDL"
        for r in (chained, plain):
            r.execute(SchedulerOutput((), 0, finished_req_ids=frozenset(f"r{i}" for i in range(n))))


def _chunked_lockstep(runners: list[ModelRunner], spies: list[list[torch.Tensor]], chunk: int,
                      steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Request ``a`` decodes while ``b``'s 300-token prompt is prefilled ``chunk`` tokens a step
    beside it (mixed steps), then both decode; teacher-forced from the first runner."""
    g = torch.Generator().manual_seed(11)
    prompts = {"a": torch.randint(1, 128000, (20,), generator=g).tolist(),
               "b": torch.randint(1, 128000, (300,), generator=g).tolist()}
    params = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
    tables = {"a": tuple(range(1, 5)), "b": tuple(range(5, 5 + -(-(300 + steps + 1) // BLOCK)))}
    seqs = {rid: list(p) for rid, p in prompts.items()}
    done = {"a": 0, "b": 0}  # tokens whose K/V are computed
    pairs = []
    for step in range(steps):
        reqs = []
        for rid in ("a", "b") if step else ("a",):  # b arrives once a is decoding
            seq, start = seqs[rid], done[rid]
            n = min(chunk, len(seq) - start) if start < len(prompts[rid]) else 1
            new = start == 0
            sample = start + n >= len(prompts[rid])
            reqs.append(ScheduledRequest(
                req_id=rid, token_ids=tuple(seq[start:start + n]), start_pos=start,
                block_ids=tables[rid] if new else (), sample=sample, is_new=new,
                params=params if new else None, prompt_len=len(prompts[rid]),
            ))
        num_tokens = sum(len(r.token_ids) for r in reqs)
        sched = SchedulerOutput(requests=tuple(reqs), num_scheduled_tokens=num_tokens)
        outs = [r.execute(sched) for r in runners]
        pairs.append((spies[0][-1].float(), spies[1][-1].float()))
        for r in reqs:
            done[r.req_id] += len(r.token_ids)
        for rid, tok in zip(outs[0].req_ids, outs[0].sampled_token_ids, strict=True):
            seqs[rid].append(tok)
    return pairs


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_mixed_graphs_match_eager(tmp_path: Path, shape: str, logits_spy: Any) -> None:
    """Steps of a prefill chunk beside a decode replay piecewise graphs (attention eager between
    captured pieces, padded to a token bucket) and give the eager results."""
    path = _write_config(tmp_path / shape, SHAPES[shape])
    graphed, eager = _runner(path, eager=False), _runner(path, eager=True)
    assert graphed.mixed_graphs is not None and graphed.mixed_graphs.captured and eager.mixed_graphs is None
    assert graphed.mixed_graphs.buckets == (16, 32, 64, 128, 256, 512)
    replays: list[tuple[int, int]] = []
    original = graphed.mixed_graphs.replay

    def counting_replay(size: int, num_tokens: int, md: Any) -> torch.Tensor:
        replays.append((size, num_tokens))
        return original(size, num_tokens, md)

    graphed.mixed_graphs.replay = counting_replay  # type: ignore[method-assign]
    spies = [logits_spy(graphed), logits_spy(eager)]
    _check(_chunked_lockstep([graphed, eager], spies, chunk=37, steps=14), rel_tol=1e-2)
    # a's 20-token prompt (bucket 32), then 9 steps of a decode beside b's chunks (38 tokens:
    # bucket 64; b's last chunk 4 + 1 = 5: bucket 16); then decodes (decode graphs).
    assert replays[0] == (32, 20)
    assert replays[1:9] == [(64, 38)] * 8 and replays[9] == (16, 5)
    assert len(replays) == 10
