"""Time each flashfuse attention kernel under fixed configurations (no autotuning), to choose the autotune
lists in kernels/attention/triton_impl.py. bf16, 16k tokens per batch, h = 2048/d, through the op (so a
dropout case saves and reads its keep bits as training does).

    python benchmarks/attention_tune.py --out DIR                          # table + DIR/attention_tune.json
    python benchmarks/attention_tune.py --d 128 --n 1024 --causal yes      # one case
    python benchmarks/attention_tune.py --d 64 --n 1024 --causal yes --dropout 0.1 --kernels DKDV DQ

Configurations are (BLOCK_M, BLOCK_N, num_warps, num_stages). FWD times the forward; DKDV and DQ time the
backward alone (preprocess, dK/dV, dQ: autograd.grad on a saved forward) while one of its two kernels varies
and the other stays at its table's first entry. Every configuration gets a fresh launch plan: plans are cached
by tensor layout, not by FLASHFUSE_ATTN_CFG_*, and before session 18 this script timed the first plan's
configuration over and over (results/attention_tune.json of 2026-11-23: all backward rows 0.848 ms); it also
set FLASHFUSE_ATTN_CFG_DKDV / _DQ, which nothing reads (the names are _BWD_DKDV / _BWD_DQ).
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import _flops, _score_mod_text  # noqa: E402

FWD = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 128, 4, 3),
       (128, 128, 8, 2), (128, 64, 8, 2), (128, 64, 8, 4)]
DKDV = [(32, 128, 8, 3), (32, 128, 4, 3), (64, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3),
        (64, 64, 4, 2), (16, 128, 4, 3), (16, 64, 4, 3), (32, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3)]
DQ = [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 3), (128, 64, 8, 2),
      (64, 128, 8, 2)]
_LISTS = {"FWD": FWD, "DKDV": DKDV, "DQ": DQ}
_TABLE = {"FWD": "attn_fwd", "DKDV": "attn_bwd_dkdv", "DQ": "attn_bwd_dq"}  # triton_impl's names


def _set(kind, cfg):
    from flashfuse.kernels.attention import triton_impl as ti
    os.environ[ti.forced_config_env(_TABLE[kind])] = ",".join(map(str, cfg))


def _unset(kind):
    from flashfuse.kernels.attention import triton_impl as ti
    os.environ.pop(ti.forced_config_env(_TABLE[kind]), None)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--d", type=int, nargs="+", default=[64, 128])
    p.add_argument("--n", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--kernels", nargs="+", choices=sorted(_LISTS), default=["FWD", "DKDV", "DQ"])
    p.add_argument("--tag", default="", help="suffix of the JSON file's name")
    args = p.parse_args()
    from triton.testing import do_bench

    import flashfuse.kernels.attention.op  # noqa: F401  (registers the op)
    from flashfuse.kernels.attention import triton_impl as ti

    rows = []
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    firsts = {}
    for d in args.d:
        first = firsts[d] = {kind: ti._TABLES[_TABLE[kind]][ti._dclass(ti._block_d(d))][0] for kind in _LISTS}
        for causal in causals:
            text = _score_mod_text(d, causal)
            for n in args.n:
                b, h = 16384 // n, 2048 // d
                g = torch.Generator(device="cuda").manual_seed(0)
                q, k, v = [torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
                           .requires_grad_(True) for _ in range(3)]
                dout = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
                rng = torch.tensor([1234, 0], dtype=torch.int64, device="cuda") if args.dropout else None
                fl = _flops(b, h, n, d, causal, "fwd")

                def op():
                    return torch.ops.flashfuse.attention(q, k, v, [], [], text, args.dropout, rng, "tf32")[0]

                def run(kind, cfg):
                    _set(kind, cfg)
                    ti._PLANS.clear()  # a plan keeps the kernel and configuration it was built with
                    try:
                        if kind == "FWD":
                            with torch.no_grad():
                                op()
                                ms = do_bench(op, warmup=10, rep=50, return_mode="median")
                            tf = fl / ms / 1e9
                        else:
                            out = op()
                            bw = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)  # noqa: E731
                            bw()
                            ms = do_bench(bw, warmup=10, rep=50, return_mode="median")
                            tf = 2.5 * fl / ms / 1e9
                        rec = dict(kernel=kind, cfg=cfg, d=d, n=n, causal=causal, dropout=args.dropout, ms=ms,
                                   tflops=tf)
                    except Exception as e:  # noqa: BLE001  (out of shared memory, ...)
                        rec = dict(kernel=kind, cfg=cfg, d=d, n=n, causal=causal, dropout=args.dropout, ms=None,
                                   tflops=None, error=f"{type(e).__name__}: {str(e)[:100]}")
                    rows.append(rec)
                    t = f"{rec['tflops']:6.1f}" if rec["tflops"] else "   n/a"
                    print(f"d={d:<3d} n={n:<5d} causal={int(causal)} p={args.dropout} {kind:5s} {str(cfg):18s} {t}"
                          " TFLOP/s " + (f"{rec['ms']:.3f} ms" if rec["ms"] else rec.get("error", "")), flush=True)

                for kind in _LISTS:  # the others stay at their table's first entry
                    _set(kind, first[kind])
                for kind in args.kernels:
                    for cfg in _LISTS[kind]:
                        run(kind, cfg)
                    _set(kind, first[kind])
                for kind in _LISTS:
                    _unset(kind)
                ti._PLANS.clear()
                del q, k, v, dout
    os.makedirs(args.out, exist_ok=True)
    json.dump(rows, open(os.path.join(args.out, f"attention_tune{args.tag}.json"), "w"), indent=1)
    print("best per case:")
    for kind in args.kernels:
        for d in args.d:
            for causal in causals:
                for n in args.n:
                    cand = [r for r in rows if r["kernel"] == kind and r["d"] == d and r["causal"] == causal
                            and r["n"] == n and r["ms"]]
                    if cand:
                        best = min(cand, key=lambda r: r["ms"])
                        print(f"  {kind:5s} d={d} causal={int(causal)} n={n}: {best['cfg']} {best['ms']:.3f} ms"
                              f" {best['tflops']:.1f} TFLOP/s (first entry: {firsts[d][kind]})")


if __name__ == "__main__":
    main()
