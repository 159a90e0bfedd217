"""What flashfuse does to a small nanoGPT-style block: run `python examples/explain_toy.py`
(optionally `--draw block.svg`). Nothing heavy runs: explain captures the graphs, runs flashfuse's
passes and reports; each graph then runs as captured, op by op.

The same model from the command line: `python -m flashfuse explain examples/explain_toy.py:make_block`.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import flashfuse


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int = 64, n_head: int = 4, block_size: int = 32, dropout: float = 0.1):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(dropout)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size))
                             .view(1, 1, block_size, block_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class Block(nn.Module):
    def __init__(self, n_embd: int = 64, n_head: int = 4, block_size: int = 32):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


def make_block():
    """A factory for `python -m flashfuse explain`: returns (model, example_inputs)."""
    torch.manual_seed(0)
    return Block(), (torch.randn(2, 16, 64),)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draw", metavar="PATH", help="also write a picture (.svg, .png or .dot)")
    parser.add_argument("--code", action="store_true", help="print each graph's code before and after")
    parser.add_argument("--fake", action="store_true", help="explain on fake tensors (nothing computed)")
    args = parser.parse_args()

    model, inputs = make_block()
    report = flashfuse.explain(model, *inputs, fake=args.fake)
    print(report.format(code=args.code))
    print()
    print("fusions per pass:", report.counts())
    for m in report.matches:
        print(f"  {m.fusion:<14} {m.source} ({m.module or 'top module'})  {m.description}")
    if args.draw:
        print("wrote", report.draw(args.draw))


if __name__ == "__main__":
    main()
