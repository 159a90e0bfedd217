"""Static SASS of the attention kernels for a GPU target, built on any machine (no GPU needed): Triton
compiles for sm_90 and the wheel's ptxas / cuobjdump do the rest. Prints instructions, a few opcode
counts, registers and ptxas's stack bytes (spills) per kernel and dropout mode: a way to compare kernel
variants when no device is at hand. Static counts are not time: confirm on the device.

    python benchmarks/sass_counts.py                       # d = 64 bf16 causal, the first configs
    python benchmarks/sass_counts.py --kernel attn_bwd_dkdv --cfg 32,128,8,3
    python benchmarks/sass_counts.py --padding counts      # HF padded causal as key counts (or: row)
"""
import argparse
import os
import subprocess
import tempfile

import sympy
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flashfuse.kernels.attention import score_mod as sm
from flashfuse.kernels.attention import triton_impl as ti

_TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_PTRS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "dOut": "*bf16", "dQ": "*bf16",
         "dK": "*bf16", "dV": "*bf16", "Stats": "*fp32", "Delta": "*fp32", "RNG": "*i64", "Flag": "*i32",
         "DQacc": "*fp32"}
# attn_bwd_fused: the dK/dV kernel with DQ_ATOMIC (it also adds dQ), under its own configs
_MODES = {"attn_fwd": (0, 1, 2), "attn_bwd_dkdv": (0, 1, 3), "attn_bwd_dq": (0, 1, 3), "attn_bwd_fused": (0, 1, 3)}
_TABLES = ti._TABLES


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([os.path.join(_TOOLS, "cuobjdump"), flag, f.name], capture_output=True,
                              text=True, check=True).stdout


def launch_ints(b: int, h: int, n: int, d: int, counts: bool) -> dict:
    """The integer arguments a launch on contiguous (B, H, N, D) tensors passes (Triton specializes on them):
    strides, lengths, heads, GROUP 1, and a (B, 1, 1, 1) count side's broadcast strides."""
    st = dict(b=h * n * d, h=n * d, m=d, n=d, d=1)
    vals = {f"stride_{t}{ax}": st[ax] for t in ("q", "k", "v", "do", "dk", "dv", "o", "dq")
            for ax in ("b", "h", "m", "n", "d")}
    vals.update(H=h, HKV=h, Nq=n, Nk=n, GROUP=1)
    if counts:
        vals.update(side0_sb=1, side0_sh=0, side0_sm=0, side0_sn=0)
    return vals


def build(mod, name, consts, warps, stages, arch, side_ptr="*i32", ints=None):
    """`ints`: the integer arguments' values at launch (launch_ints): an argument equal to 1 becomes a
    constant and pointers and multiples of 16 are marked divisible by 16, as Triton's launcher specializes.
    Without them every integer is a plain i32, and the build is not the one that runs (session 18: 255
    registers and spills where the device's build had 184 and none)."""
    if name in ("attn_bwd_dkdv", "attn_bwd_fused"):
        consts = {**consts, "DQ_ATOMIC": name == "attn_bwd_fused"}
        name = "attn_bwd_dkdv"
    fn = getattr(mod, name)
    consts = dict(consts)
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in consts:
            sig[a] = "constexpr"
            continue
        if a == "Bits":  # bytes written by the forward, int32 words read by the backward
            sig[a] = "*u8" if name == "attn_fwd" else "*i32"
        elif a in _PTRS:
            sig[a] = _PTRS[a]
        elif a.endswith("_ptr"):  # side tensors (--padding)
            sig[a] = side_ptr
        else:
            sig[a] = "fp32" if a == "keep_scale" else "i32"
        if ints is None:
            continue
        if sig[a].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif a in ints and ints[a] == 1:
            consts[a], sig[a] = 1, "constexpr"
        elif a in ints and ints[a] % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs or None)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": warps, "num_stages": stages})
    sass = [ln for ln in _cuobjdump(kernel.asm["cubin"], "-sass").splitlines()
            if ln.strip().startswith("/*") and ";" in ln]
    res = _cuobjdump(kernel.asm["cubin"], "-res-usage").split()
    usage = " ".join(x for x in res if x.startswith(("REG:", "STACK:")))
    return sass, usage


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", choices=sorted(_MODES), nargs="+", default=sorted(_MODES))
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--cfg", help="bm,bn,warps,stages (default: each kernel's first config)")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--fill", type=float, default=float("-inf"),
                    help="the causal fill: -inf (folded kernels) or a huge finite one such as -1e9 (unfolded)")
    ap.add_argument("--plain-ints", action="store_true",
                    help="every integer argument a plain i32 (before session 18), not the launch's specialization "
                         "for contiguous (8, 16, 2048, d) tensors")
    ap.add_argument("--padding", choices=("none", "row", "counts"), default="none",
                    help="causal & right padding as HF models give it: a key row loaded per block (bool side "
                         "(B, 1, 1, Nk)) or key counts (int32 side (B, 1, 1, 1), a loop bound)")
    args = ap.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    fill = -sympy.oo if args.fill == float("-inf") else sympy.Float(args.fill)
    value = sm.score / args.d ** 0.5
    side_ptr, n_sides, layout = "*i32", 0, ()
    if args.padding != "none":
        padded = (sympy.GreaterThan(sm.kv_idx, sm.key_count(sm.side(0))) if args.padding == "counts"
                  else sympy.Eq(sm.side(0), 0))
        value = sympy.Piecewise((-sympy.oo, padded), (value, True))
        side_ptr, n_sides = ("*i32", 1) if args.padding == "counts" else ("*u8", 1)
        layout = ((True, args.padding == "counts"),)
    text = sm.to_text(sympy.Piecewise((fill, sm.kv_idx > sm.q_idx + sm.Nk - sm.Nq), (value, True)))
    mod = ti.load_module(text, n_sides, 0, (), layout)
    bd = ti._block_d(args.d)
    for name in args.kernel:
        cfg = [int(x) for x in args.cfg.split(",")] if args.cfg else _TABLES[name][ti._dclass(bd)][0]
        bm, bn, warps, stages = cfg
        for mode in _MODES[name]:
            consts = dict(D=args.d, DV=args.d, BLOCK_D=bd, BLOCK_DV=bd, DOT_PREC="tf32", FAST_MATH=True,
                          FLAG_WANT=-1, BLOCK_M=bm, BLOCK_N=bn, DROPOUT=mode)
            ints = None if args.plain_ints else launch_ints(8, 16, 2048, args.d, args.padding == "counts")
            sass, usage = build(mod, name, consts, warps, stages, args.arch, side_ptr, ints)
            ops = " ".join(f"{op} {sum(op in ln for ln in sass)}" for op in ("IMAD", "LOP3", "LDG", "LDS", "HGMMA", "RED", "ATOM"))
            print(f"{name:14s} {bm}x{bn} w{warps} s{stages} DROPOUT={mode}: {len(sass):5d} instructions  {ops}  {usage}")


if __name__ == "__main__":
    main()
