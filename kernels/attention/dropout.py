"""How the attention kernels draw dropout, in plain Python (no triton import): the keep threshold and the
rescale factor, shared by the kernels' launchers, the chunked reference and the tests.

One Philox4x32-7 draw (counter: query row, group of 8 consecutive keys, batch*head, the 64-bit offset;
key: the seed) gives four 32-bit words, split into eight 16-bit numbers, one per key of the group. An
element is kept when its number is below `keep_threshold(p)` = round((1 - p) * 2^16), so the dropout rate
actually applied is p rounded to a multiple of 2^-16 (|error| <= 7.6e-6, far below bf16's resolution),
and kept values are scaled by the exact inverse of that keep rate, so the expectation is unchanged.
Eight elements per draw instead of one: the Philox rounds (integer multiplies) used to cost more than
the matmuls of a d=64 tile.
"""
from __future__ import annotations

import os

import torch

KEEP_BITS = 16
KEEP_RANGE = 1 << KEEP_BITS
KEYS_PER_DRAW = 8  # four 32-bit words, two 16-bit numbers each


def keep_threshold(p: float) -> int:
    """Kept when the element's 16-bit number is < this (0 drops everything, 2^16 keeps everything)."""
    return min(KEEP_RANGE, max(0, int(round((1.0 - float(p)) * KEEP_RANGE))))


def keep_scale(p: float) -> float:
    """Factor applied to kept values: 1 / (keep probability actually used)."""
    t = keep_threshold(p)
    return KEEP_RANGE / t if t else 0.0


def effective_p(p: float) -> float:
    """The dropout rate the kernels apply for a requested `p`."""
    return 1.0 - keep_threshold(p) / KEEP_RANGE


# ---- keep bits saved by the forward for the backward ----
# The forward packs each element's keep flag into a bit: byte (row, key // 8), bit key % 8, rows padded to
# whole 32-bit words (4 · ceil(Nk / 32) bytes), which the backward reads as int32 (key k: bit k % 32 of word
# k // 32, little-endian). The backward kernels read those bits instead of drawing Philox again (twice: the
# dK/dV and the dQ kernel); the draw costs ~13 integer ops per element, the read one byte load. The bits are
# an extra saved activation, so they are kept only while they stay small next to the attention's own saved
# tensors (see `saves_bits`); longer keys go back to drawing again.
BITS_ENV = "FLASHFUSE_DROPOUT_BITS"  # "0": never save them (the backward draws again)
_BITS_OFF = os.environ.get(BITS_ENV) == "0"


def bits_shape(bsz: int, h: int, nq: int, nk: int) -> tuple:
    return (bsz, h, nq, 4 * ((nk + 31) // 32))


def saves_bits(nk, head_dim: int, itemsize: int) -> bool:
    """Whether the forward saves the keep bits for the backward: when a row of bits (~Nk / 8 bytes) is at most
    four rows of q (4 · d · itemsize bytes), so the bits cost at most as much memory as q, k, v and out
    together (d = 64 bf16: up to Nk = 4096). `_BITS_OFF` is read once per process, so the op and its fake
    agree."""
    if _BITS_OFF:
        return False
    return 4 * ((nk + 31) // 32) <= 4 * head_dim * itemsize


def pack_bits(keep):
    """(..., Nk) bool → (..., 4 · ceil(Nk / 32)) uint8, key j in bit j % 8 of byte j // 8 (the kernels' layout;
    the padding bits are 0 here, unspecified in the kernels')."""
    nk = keep.shape[-1]
    pad = (-nk) % 32
    if pad:
        keep = torch.nn.functional.pad(keep, (0, pad))
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.int32, device=keep.device)
    grouped = keep.reshape(*keep.shape[:-1], -1, 8).to(torch.int32)
    return (grouped * weights).sum(-1).to(torch.uint8)


def unpack_bits(bits, nk: int):
    """Inverse of `pack_bits`: (..., 4 · ceil(Nk / 32)) uint8 → (..., Nk) bool."""
    shifts = torch.arange(8, dtype=torch.int32, device=bits.device)
    flags = (bits.to(torch.int32)[..., None] >> shifts) & 1
    return flags.reshape(*bits.shape[:-1], -1)[..., :nk].bool()

