"""Device (one CUDA card): the cp.async 4-bit GEMV (kernels/triton_ops/wna16_async.py) against the word kernel.
Correctness per shape, per-projection 32-layer chains (sweep), then the decoder chain A/B."""
import sys, json, itertools
from functools import partial
sys.path.insert(0, "bench")
import torch
from bench_gemv import SHAPES_8B, time_chain, decoder_chain, chain
from kernels.triton_ops import wna16
from kernels.triton_ops.wna16_async import gemv_w4_async

DEV = "cuda"
out = {}
def words(n, k):
    return (torch.randint(0, 256, (n, k // 2), device=DEV, dtype=torch.uint8),
            (torch.rand(n, k // 128, device=DEV) * 0.02 + 0.001).to(torch.bfloat16))

def ref_dq(x, qw, sc, gated):
    lo = (qw & 15).to(torch.float32) - 8; hi = (qw >> 4).to(torch.float32) - 8
    w = torch.stack([lo, hi], -1).reshape(qw.shape[0], -1) * sc.float().repeat_interleave(128, 1)
    y = x.float() @ w.t()
    if gated:
        n = y.shape[1] // 2
        g = y[:, :n].to(torch.bfloat16).float(); u = y[:, n:].to(torch.bfloat16).float()
        return (torch.nn.functional.silu(g).to(torch.bfloat16).float() * u)
    return y

def word(x, qw, sc, gated, pdl=True):
    return wna16.one_token_gemv(x, qw, sc, None, 4, 128, None, pdl=pdl, gated=gated)

CFGS = [(8, 2048, 3, 4, 2), (8, 2048, 2, 4, 2), (8, 1024, 4, 4, 2), (16, 2048, 3, 8, 2), (8, 2048, 3, 8, 2),
        (4, 2048, 3, 4, 2), (8, 2048, 3, 4, 4), (16, 1024, 4, 4, 2), (16, 2048, 2, 4, 2), (8, 1024, 3, 2, 2)]
torch.manual_seed(0)
for name, (n, k) in SHAPES_8B.items():
    gated = name == "gate_up"
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
    qw, sc = words(n, k)
    r = ref_dq(x, qw, sc, gated)
    yw = word(x, qw, sc, gated, pdl=False).float()
    for c in CFGS[:1] + CFGS[3:4]:
        try:
            ya = gemv_w4_async(x, qw, sc, gated=gated, block_n=c[0], block_k=c[1], stages=c[2], num_warps=c[3], vec=c[4]).float()
            print(f"{name} {c}: async vs ref {((ya-r).abs().max()/r.abs().max()).item():.2e}, word vs ref {((yw-r).abs().max()/r.abs().max()).item():.2e}, async vs word {((ya-yw).abs().max()/yw.abs().max()).item():.2e}", flush=True)
        except Exception as e:
            print(f"{name} {c}: ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
best = {}
for name, (n, k) in SHAPES_8B.items():
    gated = name == "gate_up"
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
    ws = [words(n, k) for _ in range(32)]
    t_word = time_chain(chain(lambda q, s: word(x, q, s, gated), ws), reps=20) * 1e3 / 32
    res = {"word": t_word}
    for c in CFGS:
        try:
            f = lambda q, s, c=c: gemv_w4_async(x, q, s, gated=gated, block_n=c[0], block_k=c[1], stages=c[2], num_warps=c[3], vec=c[4], pdl=True)
            res[c] = time_chain(chain(f, ws), reps=20) * 1e3 / 32
        except Exception as e:
            print(f"{name} {c}: ERROR {type(e).__name__}: {str(e)[:200]}", flush=True)
    b = min((v, c) for c, v in res.items() if c != "word")
    best[name] = b[1]
    print(f"{name}: word {t_word:.2f} us; async " + ", ".join(f"{c}={v:.2f}" for c, v in res.items() if c != "word") + f"; best {b[1]} {b[0]:.2f}", flush=True)
    out[name] = {str(c): v for c, v in res.items()}
    del ws; torch.cuda.empty_cache()

layers = [{nm: words(n, k) for nm, (n, k) in SHAPES_8B.items()} for _ in range(32)]
def lin_word(h, w, gated=False): return word(h, *w, gated)
def lin_async(h, w, gated=False):
    n = w[0].shape[0]; k = w[0].shape[1] * 2
    nm = "gate_up" if gated else {v: kk for kk, v in SHAPES_8B.items()}[(n, k)]
    c = best[nm]
    return gemv_w4_async(h, *w, gated=gated, block_n=c[0], block_k=c[1], stages=c[2], num_warps=c[3], vec=c[4], pdl=True)
for rnd in range(3):
    for nm, lin in (("word", lin_word), ("async", lin_async)):
        run = decoder_chain(layers, lin, partial(lin, gated=True), norm_pdl=True)
        t = time_chain(run, reps=20) * 1e3 / 32
        out.setdefault("decoder", {}).setdefault(nm, []).append(t)
        print(f"decoder round {rnd} {nm}: {t:.2f} us per layer", flush=True)
import os
json.dump(out, open(os.environ.get("OUT", "/tmp") + "/async_chain.json", "w"), indent=1)
