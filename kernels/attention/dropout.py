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
