"""Time each flashfuse attention kernel under fixed configurations (no autotuning), to choose the autotune
lists in kernels/attention/triton_impl.py. bf16, 16k tokens per batch, h = 2048/d.

    python benchmarks/attention_tune.py --out DIR    # table + DIR/attention_tune.json

Configurations are (BLOCK_M, BLOCK_N, num_warps, num_stages). The backward is timed as a whole (preprocess,
dK/dV, dQ) while one of its two kernels varies and the other stays at its first candidate.
"""
import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import _flops, _score_mod_text  # noqa: E402

FWD = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)]
DKDV = [(32, 128, 8, 3), (32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (16, 128, 4, 3)]
DQ = [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--d", type=int, nargs="+", default=[64, 128])
    p.add_argument("--n", type=int, nargs="+", default=[1024, 8192])
    args = p.parse_args()
    from triton.testing import do_bench
    from flashfuse.kernels.attention import triton_impl as ti

    rows = []
    for d in args.d:
        for causal in (False, True):
            text = _score_mod_text(d, causal)
            for n in args.n:
                b, h = 16384 // n, 2048 // d
                q, k, v = [torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
                dout = torch.randn_like(q)
                fl = _flops(b, h, n, d, causal, "fwd")

                def run(kind, cfg):
                    env = f"FLASHFUSE_ATTN_CFG_{kind}"
                    os.environ[env] = ",".join(map(str, cfg))
                    try:
                        out, lse = ti.attention_forward(q, k, v, [], [], text, 0.0, None, "tf32")
                        if kind == "FWD":
                            ms = do_bench(lambda: ti.attention_forward(q, k, v, [], [], text, 0.0, None, "tf32"),
                                          warmup=10, rep=40, return_mode="median")
                            tf = fl / ms / 1e9
                        else:
                            bw = lambda: ti.attention_backward(dout, q, k, v, out, lse, [], [], text, 0.0, None,  # noqa
                                                               [], "tf32")
                            bw()
                            ms = do_bench(bw, warmup=10, rep=40, return_mode="median")
                            tf = 2.5 * fl / ms / 1e9
                        rec = dict(kernel=kind, cfg=cfg, d=d, n=n, causal=causal, ms=ms, tflops=tf)
                    except Exception as e:  # noqa: BLE001  (out of shared memory, ...)
                        rec = dict(kernel=kind, cfg=cfg, d=d, n=n, causal=causal, ms=None, tflops=None,
                                   error=f"{type(e).__name__}: {str(e)[:100]}")
                    rows.append(rec)
                    t = f"{rec['tflops']:6.1f}" if rec["tflops"] else "   n/a"
                    print(f"d={d:<3d} n={n:<5d} causal={int(causal)} {kind:5s} {str(cfg):18s} {t} TFLOP/s "
                          + (f"{rec['ms']:.3f} ms" if rec["ms"] else rec.get("error", "")), flush=True)

                os.environ["FLASHFUSE_ATTN_CFG_DKDV"] = ",".join(map(str, DKDV[0]))
                os.environ["FLASHFUSE_ATTN_CFG_DQ"] = ",".join(map(str, DQ[0]))
                for cfg in FWD:
                    run("FWD", cfg)
                os.environ["FLASHFUSE_ATTN_CFG_FWD"] = ",".join(map(str, FWD[0]))
                for cfg in DKDV:
                    run("DKDV", cfg)
                os.environ["FLASHFUSE_ATTN_CFG_DKDV"] = ",".join(map(str, DKDV[0]))
                for cfg in DQ:
                    run("DQ", cfg)
                for kind in ("FWD", "DKDV", "DQ"):
                    os.environ.pop(f"FLASHFUSE_ATTN_CFG_{kind}", None)
                del q, k, v, dout
    os.makedirs(args.out, exist_ok=True)
    json.dump(rows, open(os.path.join(args.out, "attention_tune.json"), "w"), indent=1)
    print("best per case:")
    for kind in ("FWD", "DKDV", "DQ"):
        for d in args.d:
            for causal in (False, True):
                for n in args.n:
                    cand = [r for r in rows if r["kernel"] == kind and r["d"] == d and r["causal"] == causal
                            and r["n"] == n and r["ms"]]
                    if cand:
                        best = min(cand, key=lambda r: r["ms"])
                        print(f"  {kind:5s} d={d} causal={int(causal)} n={n}: {best['cfg']} {best['tflops']:.1f}")


if __name__ == "__main__":
    main()
