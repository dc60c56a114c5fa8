"""Counter-based random numbers: reproducible per (seed, step, token) and fully batched.

Each sampled row draws its Gumbel noise from a hash of its own seed and step, so a seeded
request gives the same tokens alone or in any batch, with no per-request generator loop.
"""

from __future__ import annotations

import torch

_M1 = -49064778989728563  # 0xff51afd7ed558ccd as int64
_M2 = -4265267296055464877  # 0xc4ceb9fe1a85ec53 as int64
_GOLDEN = -7046029254386353131  # 0x9e3779b97f4a7c15 as int64
_LOW31 = (1 << 31) - 1


def _fmix64(x: torch.Tensor) -> torch.Tensor:
    # MurmurHash3's finalizer; logical shifts emulated with a mask (torch shifts int64 arithmetically).
    x = x ^ ((x >> 33) & _LOW31)
    x = x * _M1
    x = x ^ ((x >> 33) & _LOW31)
    x = x * _M2
    return x ^ ((x >> 33) & _LOW31)


def uniform(seeds: torch.Tensor, steps: torch.Tensor, width: int) -> torch.Tensor:
    """seeds, steps: [B] int64 -> [B, width] float32 uniform in (0, 1)."""
    row = _fmix64(seeds * _GOLDEN + steps)  # [B]
    cols = torch.arange(width, device=seeds.device, dtype=torch.int64)
    x = _fmix64(row[:, None] + cols[None, :] * _GOLDEN)
    # 23 bits: (bits + 0.5) / 2^23 is exact in float32 and at most 1 - 2^-24. (With 24 bits the
    # largest value rounded to 1.0, whose Gumbel noise is +inf: one token in 2^24 would win the
    # draw whatever its probability, or a masked one, -inf + inf = NaN, win argmax.)
    return to_unit((x >> 41) & ((1 << BITS) - 1))


BITS = 23


def to_unit(bits: torch.Tensor) -> torch.Tensor:
    """BITS-bit patterns -> float32 in (0, 1), the largest strictly below 1."""
    return (bits.float() + 0.5) / float(1 << BITS)


def gumbel(seeds: torch.Tensor, steps: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] float32 standard Gumbel noise."""
    return -torch.log(-torch.log(uniform(seeds, steps, width)))
