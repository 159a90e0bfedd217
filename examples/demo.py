"""flashfuse demo: compile a small hand-written GPT block, show what was fused, check it against eager.

Runs on CUDA when there is a GPU; otherwise on CPU, where the Triton kernels run in Triton's
interpreter (TRITON_INTERPRET=1, set below before triton is imported).
    python examples/demo.py
"""
import glob
import math
import os
import sys

if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import flashfuse  # noqa: E402


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention, written by hand (not F.scaled_dot_product_attention)."""

    def __init__(self, n_embd, n_head, block_size, dropout):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd = n_head, n_embd
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd=64, n_head=4, block_size=64, dropout=0.1):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def main() -> int:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    T = 256 if device == "cuda" else 24
    model = Block(block_size=T).to(device).eval()
    x = torch.randn(2, T, 64, device=device)
    print(f"device: {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'Triton interpreter'}), "
          f"torch {torch.__version__}")

    report = flashfuse.explain(model, x)
    print(report)

    compiled = torch.compile(model, backend="flashfuse")
    with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
        out = compiled(x)
        ref = model(x)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    tol = 2e-2 if device == "cuda" else 1e-4
    n_att = report.count("attention")
    print(f"fused attention blocks: {n_att}; relative error vs eager: {err:.2e} (tolerance {tol:g})")
    if n_att == 0:
        print("nothing was fused: see the near-misses above")
    ok = err < tol and n_att == 1
    print("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
