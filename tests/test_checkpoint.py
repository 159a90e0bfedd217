"""Activation checkpointing: `torch.utils.checkpoint.checkpoint(f, ..., use_reentrant=False)` reaches the backend as
Dynamo's tag_activation_checkpoint(body, *args). Its body is rewritten like any graph
(pipeline.rewrite_checkpoint_bodies) and the region stays a checkpoint: fused ops included, it is recomputed in
the backward. Before, the higher-order op made the re-trace refuse the whole graph (no fusion anywhere)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import flashfuse
from flashfuse.testing import assert_close_to_eager

E, H, T = 16, 2, 13


class CausalSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(E, 3 * E), nn.Linear(E, E)
        self.register_buffer("bias", torch.tril(torch.ones(T, T)).view(1, 1, T, T))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, H, c // H).transpose(1, 2) for z in self.c_attn(x).split(E, dim=2))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = F.softmax(att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf")), dim=-1)
        return self.c_proj((att @ v).transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(E), CausalSelfAttention(), nn.LayerNorm(E)
        self.mlp = nn.Sequential(nn.Linear(E, 4 * E), nn.GELU(), nn.Linear(4 * E, E))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CheckpointedBlocks(nn.Module):
    """HF-style gradient checkpointing: each layer one checkpointed region, a norm outside them."""

    def __init__(self, n=2):
        super().__init__()
        self.layers, self.ln_f = nn.ModuleList([Block() for _ in range(n)]), nn.LayerNorm(E)

    def forward(self, x):
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False)
        return self.ln_f(x)


class NestedCheckpoint(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, x):
        return checkpoint(lambda y: checkpoint(self.block, y, use_reentrant=False), x, use_reentrant=False)


def _x(seed=0):
    return torch.randn(2, T, E, generator=torch.Generator().manual_seed(seed))


def test_attention_inside_checkpointed_layers_is_fused_and_matches_eager():
    model = CheckpointedBlocks()
    report = flashfuse.explain(model, _x(), options={"remainder": "eager"})
    assert report.count("attention") == 2, str(report)
    assert report.count("layer_norm") + report.count("residual_norm") >= 3, str(report)  # in and outside the regions
    assert not any("passes skipped" in note for g in report.graphs for note in g.notes), str(report)
    assert_close_to_eager(model, _x(1), options={"remainder": "eager"}, grads=True, rtol=1e-4, atol=1e-5)


def test_nested_checkpoints_are_rewritten_inside_out():
    model = NestedCheckpoint()
    report = flashfuse.explain(model, _x(), options={"remainder": "eager"})
    assert report.count("attention") == 1, str(report)
    assert_close_to_eager(model, _x(2), options={"remainder": "eager"}, grads=True, rtol=1e-4, atol=1e-5)


class _Calls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_fused_region_is_recomputed_in_the_backward():
    """Still a checkpoint: the backward runs the region's forward again, the fused attention with it."""
    model = CheckpointedBlocks(n=1)
    compiled = torch.compile(model, backend=flashfuse.backend(remainder="eager"))
    x = _x(3).requires_grad_(True)
    out = compiled(x)
    with _Calls() as calls:
        out.sum().backward()
    assert any(n.startswith("flashfuse.attention.") for n in calls.names), calls.names
    assert any(n.startswith("flashfuse.attention_backward.") for n in calls.names)


def test_checkpointed_layers_under_inductor():
    model = CheckpointedBlocks(n=1)
    report = flashfuse.explain(model, _x(), options={"remainder": "inductor", "norm_policy": "always"})
    assert report.count("attention") == 1, str(report)
    assert_close_to_eager(model, _x(4), options={"remainder": "inductor"}, grads=True, rtol=1e-4, atol=1e-5)
