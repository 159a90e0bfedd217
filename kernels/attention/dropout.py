"""How the attention kernels draw dropout, in plain Python (no triton import): the keep threshold and the
rescale factor, shared by the kernels' launchers, the chunked reference and the tests.

One Philox4x32-7 draw (counter: query row · 4 ⌈Nk / 32⌉ + 4 · span + lane, batch*head, the 64-bit offset;
key: the seed) gives four 32-bit words, split into eight 16-bit numbers, one per key: word i, half b of
draw (span s, lane l) belongs to key 32 s + 8 i + 2 l + b. That spread is the set of columns one thread
holds in a row of a Hopper wgmma accumulator, so each GPU thread compares the numbers of its own draws
(no shuffle of the tile through shared memory). An element is kept when its number is below
`keep_threshold(p)` = round((1 - p) * 2^16), so the dropout rate actually applied is p rounded to a multiple
of 2^-16 (|error| <= 7.6e-6, far below bf16's resolution), and kept values are scaled by the exact inverse
of that keep rate, so the expectation is unchanged. Eight elements per draw instead of one: the Philox
rounds (integer multiplies) used to cost more than the matmuls of a d=64 tile.
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
# The forward packs each element's keep flag into a bit, one byte per draw: byte 4 s + l of a row holds draw
# (span s, lane l), word i half b at bit 2 i + b. Rows are 4 · ceil(Nk / 32) bytes, which the backward reads as
# int32 (little-endian: key 32 w + j is bit 8 ((j % 8) // 2) + 2 (j // 8) + j % 2 of word w). The backward
# kernels can read those bits instead of drawing Philox again (twice: the dK/dV and the dQ kernel). Measured on
# the H200 (docs/perf-notes.md, session 6), once the draw followed the accumulator's lanes the saving forward
# lost what the reading backward won, and the bits cost memory. So saving is opt-in: FLASHFUSE_DROPOUT_BITS=1,
# and only while the bits stay small next to the attention's own saved tensors (see `saves_bits`).
BITS_ENV = "FLASHFUSE_DROPOUT_BITS"  # "1": save them (the backward reads them instead of drawing again)
_BITS_ON = os.environ.get(BITS_ENV, "0") == "1"


def bits_shape(bsz: int, h: int, nq: int, nk: int) -> tuple:
    return (bsz, h, nq, 4 * ((nk + 31) // 32))


def saves_bits(nk, head_dim: int, itemsize: int) -> bool:
    """Whether the forward saves the keep bits for the backward: when a row of bits (~Nk / 8 bytes) is at most
    four rows of q (4 · d · itemsize bytes), so the bits cost at most as much memory as q, k, v and out
    together (d = 64 bf16: up to Nk = 4096), and only with FLASHFUSE_DROPOUT_BITS=1. `_BITS_ON` is read
    once per process, so the op and its fake agree."""
    if not _BITS_ON:
        return False
    return 4 * ((nk + 31) // 32) <= 4 * head_dim * itemsize


def _bit_of_key(device):
    """Position (0..31) in its span's 32-bit word of each key 0..31 of the span."""
    j = torch.arange(32, device=device)
    return 8 * ((j % 8) // 2) + 2 * (j // 8) + j % 2


def pack_bits(keep):
    """(..., Nk) bool → (..., 4 · ceil(Nk / 32)) uint8 in the kernels' layout (see above; the padding bits are 0
    here, unspecified in the kernels')."""
    nk = keep.shape[-1]
    pad = (-nk) % 32
    if pad:
        keep = torch.nn.functional.pad(keep, (0, pad))
    spans = keep.reshape(*keep.shape[:-1], -1, 32).to(torch.int32)
    ordered = torch.empty_like(spans)
    ordered[..., _bit_of_key(keep.device)] = spans  # by bit position
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.int32, device=keep.device)
    grouped = ordered.reshape(*keep.shape[:-1], -1, 8)
    return (grouped * weights).sum(-1).to(torch.uint8)


def unpack_bits(bits, nk: int):
    """Inverse of `pack_bits`: (..., 4 · ceil(Nk / 32)) uint8 → (..., Nk) bool."""
    shifts = torch.arange(8, dtype=torch.int32, device=bits.device)
    flags = ((bits.to(torch.int32)[..., None] >> shifts) & 1).reshape(*bits.shape[:-1], -1, 32)
    by_key = flags[..., _bit_of_key(bits.device)]
    return by_key.reshape(*bits.shape[:-1], -1)[..., :nk].bool()
