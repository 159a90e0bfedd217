"""Attention benchmark (H100): flashfuse's generated kernels vs torch SDPA (flash, cuDNN, efficient) and
compiled flex_attention, bf16, d in {64, 128}, n = 512 .. 16384 with 16k tokens per batch and h = 2048/d,
causal and not, forward and forward+backward; plus hand-written attention variants through torch.compile
(nanoGPT causal, tanh softcap, ALiBi; b=8 h=16 n=2048 d=64, forward) with flashfuse vs Inductor.

    python benchmarks/attention.py --part sweep --out DIR        # TFLOP/s table + DIR/attention_sweep.json
    python benchmarks/attention.py --part handwritten --out DIR  # ms table + DIR/attention_handwritten.json
    python benchmarks/attention.py --plot DIR/attention_sweep.json --out benchmarks/results   # PNG

Times are `triton.testing.do_bench` medians. FLOPs: 4·B·H·N²·d forward (half for causal); backward 2.5x
forward, so forward+backward counts 3.5x.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch


def _flops(b, h, n, d, causal, mode):
    f = 4 * b * h * n * n * d * (0.5 if causal else 1.0)
    return f * (3.5 if mode == "fwd+bwd" else 1.0)


def _score_mod_text(d, causal):
    import sympy
    from flashfuse.kernels.attention import score_mod as sm
    scale = sympy.Float(1.0 / math.sqrt(d))
    expr = scale * sm.score
    if causal:
        expr = sympy.Piecewise((-sympy.oo, sm.kv_idx > sm.q_idx + sm.Nk - sm.Nq), (expr, True))
    return sm.to_text(expr)


def _make_impl(name, d, causal, n, dropout=0.0):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "flashfuse":
        import flashfuse.kernels.attention.op  # noqa: F401
        text = _score_mod_text(d, causal)
        rng = torch.tensor([1234, 0], dtype=torch.int64, device="cuda") if dropout else None
        return lambda q, k, v: torch.ops.flashfuse.attention(q, k, v, [], [], text, dropout, rng, "tf32")[0]
    if dropout and name != "sdpa_flash":
        raise NotImplementedError("dropout is compared against SDPA's flash backend only")
    if name.startswith("sdpa_"):
        backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                   "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}[name]

        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout)
        return run
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        global _FLEX
        if _FLEX is None:  # one compiled wrapper: recompiles go dynamic after the first new length
            _FLEX = torch.compile(flex_attention)
        flex = _FLEX
        mask = None
        if causal:
            mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, n, n, device="cuda")
        return lambda q, k, v: flex(q, k, v, block_mask=mask)
    raise ValueError(name)


_FLEX = None


def _bench(fn, grads=None):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median")


def sweep(args):
    torch._dynamo.config.cache_size_limit = 256
    try:
        torch._dynamo.config.recompile_limit = 256
    except AttributeError:
        pass
    rows = []
    t0 = time.time()
    for d in args.d:
        for causal in (False, True) if args.causal == "both" else (args.causal == "yes",):
            for n in args.n:
                b, h = max(1, args.tokens // n), 2048 // d
                q, k, v = [torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3)]
                dout = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
                for name in args.impls:
                    for mode in args.modes:
                        rec = dict(impl=name, d=d, n=n, b=b, h=h, causal=causal, mode=mode, dropout=args.dropout)
                        if name == "flex" and args.deadline and time.time() - t0 > args.deadline:
                            rec.update(ms=None, tflops=None, error="skipped: benchmark deadline")
                            rows.append(rec)
                            continue
                        try:
                            fn = _make_impl(name, d, causal, n, args.dropout)
                            if mode == "fwd":
                                with torch.no_grad():
                                    fn(q, k, v)
                                    torch.cuda.synchronize()
                                    ms = _bench(lambda: fn(q, k, v))
                            else:
                                def step():
                                    fn(q, k, v).backward(dout)
                                step()
                                torch.cuda.synchronize()
                                ms = _bench(step, grads=[q, k, v])
                            rec.update(ms=ms, tflops=_flops(b, h, n, d, causal, mode) / ms / 1e9)
                        except Exception as e:  # a backend that does not support this case
                            rec.update(ms=None, tflops=None, error=f"{type(e).__name__}: {str(e)[:120]}")
                        rows.append(rec)
                        t = f"{rec['tflops']:7.1f}" if rec["tflops"] else "    n/a"
                        print(f"d={d:<4d} n={n:<6d} causal={int(causal)} {mode:8s} {name:15s} {t} TFLOP/s"
                              + (f"  ({rec['ms']:.3f} ms)" if rec["ms"] else f"  {rec.get('error', '')}"),
                              flush=True)
                del q, k, v, dout
                torch.cuda.empty_cache()
                if args.partial:  # keep what was measured if the run is cut short
                    json.dump(dict(rows=rows), open(args.partial, "w"), indent=1)
    return rows


def handwritten(args):
    """Hand-written attention modules through torch.compile: flashfuse backend vs Inductor (and flex)."""
    import torch.nn.functional as F
    import flashfuse
    from flashfuse.kernels.attention import score_mod as sm
    import sympy

    b, h, n, d = 8, 16, 2048, 64
    scale = 1.0 / math.sqrt(d)
    q, k, v = [torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    tril = torch.tril(torch.ones(n, n, device="cuda")).view(1, 1, n, n)
    # bf16 like the scores: fp32 slopes would promote the scores to fp32 and `P @ v` would mix dtypes
    slopes = torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)], device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(n, device="cuda")

    def nanogpt(q, k, v):
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(tril[:, :, :n, :n] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        return att @ v

    def softcap(q, k, v):
        att = (q @ k.transpose(-2, -1)) * scale
        att = 30.0 * torch.tanh(att / 30.0)
        return F.softmax(att, dim=-1) @ v

    def alibi(q, k, v):
        att = (q @ k.transpose(-2, -1)) * scale
        att = att + slopes.view(1, h, 1, 1) * (pos.view(1, 1, 1, n) - pos.view(1, 1, n, 1))
        att = att.masked_fill(pos.view(n, 1) < pos.view(1, n), float("-inf"))
        return F.softmax(att, dim=-1) @ v

    fmin = torch.finfo(torch.bfloat16).min

    def hf_additive_causal(q, k, v):  # HF GPT-2 / LLaMA eager: scores + a (0 | finfo.min) mask made in-graph
        i = torch.arange(q.shape[-2], device=q.device)
        add = torch.zeros((), device=q.device, dtype=q.dtype).masked_fill(i.view(-1, 1) < i.view(1, -1), fmin)
        att = (q @ k.transpose(-2, -1)) * scale + add
        return F.softmax(att, dim=-1) @ v

    # HF with a padding mask: one (B, 1, N, N) bool mask of causal & right padding (half the batch pads 1/8)
    keep = torch.ones(b, 1, 1, n, dtype=torch.bool, device="cuda")
    keep[: b // 2, ..., n - n // 8:] = False
    padded = torch.ones(n, n, dtype=torch.bool, device="cuda").tril() & keep

    def hf_padded_causal(q, k, v):
        att = ((q @ k.transpose(-2, -1)) * scale).masked_fill(~padded, fmin)
        return F.softmax(att, dim=-1) @ v

    S, QI, KI, NQ, NK = sm.score, sm.q_idx, sm.kv_idx, sm.Nq, sm.Nk
    direct = {  # the same modification for the op called directly (when the pass does not fire)
        "nanogpt_causal": (sympy.Piecewise((-sympy.oo, KI > QI), (scale * S, True)), []),
        "softcap": (30.0 * sympy.tanh(scale * S / 30.0), []),
        "alibi": (sympy.Piecewise((-sympy.oo, QI < KI), (scale * S + sm.side(0) * (KI - QI), True)),
                  [slopes.view(1, h, 1, 1)]),
        "hf_additive_causal": (scale * S + sympy.Piecewise((0, KI <= QI), (fmin, True)), []),
        "hf_padded_causal": (sympy.Piecewise((scale * S, sympy.Ne(sm.side(0), 0)), (fmin, True)), [padded]),
    }
    rows = []
    for name, fn in (("nanogpt_causal", nanogpt), ("softcap", softcap), ("alibi", alibi),
                     ("hf_additive_causal", hf_additive_causal), ("hf_padded_causal", hf_padded_causal)):
        if args.cases and name not in args.cases:
            continue
        with torch.no_grad():
            ref = fn(q.float(), k.float(), v.float())
            res = {}
            try:
                fused = flashfuse.explain(fn, q, k, v).count("attention")
            except Exception as e:  # noqa: BLE001
                fused, res["explain_error"] = 0, f"{type(e).__name__}: {str(e)[:200]}"
            if fused:
                ff = torch.compile(fn, backend="flashfuse")
                how = "torch.compile(backend='flashfuse')"
            else:
                import flashfuse.kernels.attention.op  # noqa: F401
                expr, sides = direct[name]
                text = sm.to_text(expr)
                ff = lambda q, k, v, t=text, s=sides: torch.ops.flashfuse.attention(  # noqa: E731
                    q, k, v, s, [], t, 0.0, None, "tf32")[0]
                how = "op called directly (the attention pass did not fuse it)"
            out = ff(q, k, v)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            res.update(flashfuse_ms=_bench(lambda: ff(q, k, v)), flashfuse_how=how, flashfuse_rel_err=err)
            ind = torch.compile(fn)
            ind(q, k, v)
            res["inductor_ms"] = _bench(lambda: ind(q, k, v))
            if name == "softcap":
                from torch.nn.attention.flex_attention import flex_attention
                flex = torch.compile(flex_attention)
                mod = lambda s, b_, h_, qi, ki: 30.0 * torch.tanh(s / 30.0)  # noqa: E731
                flex(q, k, v, score_mod=mod)
                res["flex_ms"] = _bench(lambda: flex(q, k, v, score_mod=mod))
        rows.append(dict(case=name, b=b, h=h, n=n, d=d, **res))
        print(f"{name:15s} flashfuse {res['flashfuse_ms']:.3f} ms ({how}, rel err {err:.1e})  "
              f"inductor {res['inductor_ms']:.3f} ms" + (f"  flex {res['flex_ms']:.3f} ms" if 'flex_ms' in res else ""),
              flush=True)
    return rows


def plot(json_path, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.load(open(json_path))["rows"]
    ds = sorted({r["d"] for r in rows})
    modes = [m for m in ("fwd", "fwd+bwd") if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(len(modes), 2 * len(ds), figsize=(5 * 2 * len(ds), 4 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        for j, (d, causal) in enumerate((d, c) for d in ds for c in (False, True)):
            ax = axes[i][j]
            for c, impl in enumerate(sorted({r["impl"] for r in rows})):
                pts = sorted((r["n"], r["tflops"]) for r in rows if r["impl"] == impl and r["d"] == d
                             and r["causal"] == causal and r["mode"] == mode and r["tflops"])
                if pts:  # one colour per implementation in every panel
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl, color=f"C{c}")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{mode}, d={d}, {'causal' if causal else 'non-causal'} (bf16, H100)")
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, os.path.basename(json_path).replace(".json", ".png"))
    fig.savefig(path, dpi=110)
    print("wrote", path)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=["sweep", "handwritten"], default="sweep")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--d", type=int, nargs="+", default=[64, 128])
    p.add_argument("--n", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    p.add_argument("--impls", nargs="+", default=["flashfuse", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex"])
    p.add_argument("--plot", help="only plot this sweep JSON")
    p.add_argument("--deadline", type=float, default=0, help="seconds after which flex cases are skipped")
    p.add_argument("--partial", help="rewrite this JSON after every shape")
    p.add_argument("--cases", nargs="+", help="--part handwritten: only these variants (e.g. alibi softcap)")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="attention dropout p (flashfuse vs sdpa_flash); written to attention_sweep_dropout.json")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.plot:
        plot(args.plot, args.out)
        return
    import triton
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(env, flush=True)
    rows = sweep(args) if args.part == "sweep" else handwritten(args)
    suffix = "_dropout" if args.part == "sweep" and args.dropout else ""
    path = os.path.join(args.out, f"attention_{args.part}{suffix}.json")
    json.dump(dict(env=env, args=vars(args), rows=rows), open(path, "w"), indent=1)
    print("wrote", path)
    if args.part == "sweep":
        try:
            plot(path, args.out)
        except ImportError:
            print("matplotlib missing here: plot later with --plot", file=sys.stderr)


if __name__ == "__main__":
    main()
