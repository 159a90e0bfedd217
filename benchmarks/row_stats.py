"""Cost of saving the row max and log2(l) apart (session 10): flashfuse::attention forward and
forward+backward on score modifications that take each path, bf16, b=8 h=16 n=2048 d=64, causal.

  causal_-inf          folded, one joined log-sum-exp in the backward (the common path: unchanged)
  causal_finfo.min     a huge finite fill by index: since session 11 run as -inf (no row is all fill)
  causal_finfo.min_mask_side  the same fill under a bool mask tensor: unfolded, P = exp2((s - m)·log2e - log2 l)
  causal_bias_side     a float (1, H, N, N) bias: unfolded before and after, one more add per element
  causal_padding_row   causal by index & a (B, 1, 1, N) bool key-padding row, nested as HF padded causal LMs
                       get it after the split (mask_recognition._wrap_causal; half the batch pads its last
                       N/8 keys). Session 13's run had one flat Piecewise: no block skipped, 4x the time.
  causal_alibi_slope   ALiBi: a (1, H, 1, 1) slope side times (kv_idx - q_idx), causal by index
  causal_key_counts    the padding of causal_padding_row as key counts (B, 1, 1, 1), a loop bound: what
                       mask_recognition now makes of right padding
  FLASHFUSE_ATTN_SIDE_PREFETCH=1 hoists / prefetches the side loads (codegen.side_loads; off by default)

Run it twice on one machine, once with a copy of the previous version first on PYTHONPATH, to compare.
Prints one JSON line per case (median ms over triton.testing.do_bench): forward, forward+backward through
the op, the backward kernels alone, and the tiles the autotuner chose (FLASHFUSE_ATTN_AUTOTUNE=0: the first
of each table, so that two versions run the same tiles).
"""
import argparse
import json
import math

import sympy
import torch
from triton.testing import do_bench

import flashfuse
import flashfuse.kernels.attention.op  # noqa: F401  (registers the op)
from flashfuse.kernels.attention import score_mod as sm
from flashfuse.kernels.attention import triton_impl as ti
from profiling import kernel_times  # benchmarks/profiling.py (this script's folder is on sys.path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", default="current")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--cases", nargs="+", help="only these cases")
    ap.add_argument("--table", help="print the lines of this JSONL output as a table and exit")
    ap.add_argument("--d", type=int, default=64, help="head dim (h stays 16)")
    ap.add_argument("--once", action="store_true",
                    help="one forward + backward per case, then exit: for ncu (-k regex:attn_bwd_dkdv -c 1)")
    ap.add_argument("--profile", action="store_true",
                    help="also each backward kernel's time (torch.profiler over 20 backward calls)")
    args = ap.parse_args()
    if args.table:
        for ln in open(args.table):
            r = json.loads(ln)
            print(f"{r['label']:12s} {r['case']:28s} fwd {r['fwd_ms']:.4f} fwd+bwd {r['fwd_bwd_ms']:.4f} "
                  f"bwd {r['bwd_ms']:.4f}", r.get("bwd_kernels_us", ""))
        return
    b, h, n, d = 8, 16, args.n, args.d
    b = max(1, 16384 // n)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = [torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
               for _ in range(3)]
    S, QI, KI = sm.score, sm.q_idx, sm.kv_idx
    scale = 1.0 / math.sqrt(d)
    causal_mask = torch.ones(n, n, dtype=torch.bool, device="cuda").triu(1)[None, None]
    bias = torch.randn(1, h, n, n, device="cuda", generator=g)  # a relative-position-like bias: stays a side
    keep = torch.ones(b, 1, 1, n, dtype=torch.bool, device="cuda")
    keep[: b // 2, ..., n - n // 8:] = False
    counts = keep.sum(-1, keepdim=True, dtype=torch.int32)  # (B, 1, 1, 1)
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / h) for i in range(h)], device="cuda").view(1, h, 1, 1)
    cases = {
        "causal_-inf": (sympy.Piecewise((-sympy.oo, KI > QI), (scale * S, True)), []),
        "causal_finfo.min": (sympy.Piecewise((-3.4028234663852886e38, KI > QI), (scale * S, True)), []),
        "causal_bias_side": (sympy.Piecewise((-sympy.oo, KI > QI), (scale * S + sm.side(0), True)), [bias]),
        # the causal mask as a bool tensor under finfo.min (a padding mask's spelling): rows could be all fill
        "causal_finfo.min_mask_side": (sympy.Piecewise((-3.4028234663852886e38, sympy.Ne(sm.side(0), 0)),
                                                       (scale * S, True)), [causal_mask]),
        # nested: one Piecewise would merge both -inf cases into a condition that is not index-only
        "causal_padding_row": (sympy.Piecewise((-sympy.oo, KI > QI), (sympy.Piecewise(
            (-sympy.oo, sympy.Eq(sm.side(0), 0)), (scale * S, True)), True)), [keep]),
        "causal_alibi_slope": (sympy.Piecewise((-sympy.oo, KI > QI), (scale * S + sm.side(0) * (KI - QI), True)),
                               [slopes]),
        # the same padding as key counts (right padding: each batch keeps a prefix), a loop bound
        "causal_key_counts": (sympy.Piecewise((-sympy.oo, KI > QI), (sympy.Piecewise(
            (-sympy.oo, KI >= sm.key_count(sm.side(0))), (scale * S, True)), True)), [counts]),
    }
    dout = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    for name in args.cases or list(cases):  # in the order given, repeats allowed (clock drift over a run)
        expr, sides = cases[name]
        text = sm.to_text(expr)

        def fwd():
            return torch.ops.flashfuse.attention(q, k, v, sides, [], text, 0.0, None, "tf32")[0]

        def fwd_bwd():
            fwd().backward(dout)

        with torch.no_grad():
            fwd()
        fwd_bwd()
        if args.once:
            torch.cuda.synchronize()
            continue
        row = dict(label=args.label, case=name, b=b, h=h, n=n, d=d, device=torch.cuda.get_device_name(),
                   version=getattr(flashfuse, "__version__", "?"))
        with torch.no_grad():
            row["fwd_ms"] = do_bench(fwd, warmup=25, rep=200, return_mode="median")
        row["fwd_bwd_ms"] = do_bench(fwd_bwd, warmup=25, rep=200, grad_to_none=[q, k, v], return_mode="median")
        # the backward kernels alone (preprocess, dK/dV, dQ), on the forward's saved outputs
        with torch.no_grad():
            out, stats = ti.attention_forward(q, k, v, sides, [], text, 0.0, None, "tf32")
        grads = [False] * len(sides)

        def bwd():
            return ti.attention_backward(dout, q, k, v, out, stats, sides, [], text, 0.0, None, grads, "tf32")

        row["bwd_ms"] = do_bench(bwd, warmup=25, rep=200, return_mode="median")
        if args.profile:
            row["bwd_kernels_us"] = {k: round(t, 1) for k, t in kernel_times(bwd, width=40).items()}
        row["configs"] = {f"{key[0] % 10007}/{key[1]}/{key[2]}": str(getattr(t, "best_config", None))
                          for key, t in ti._TUNED.items()}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
