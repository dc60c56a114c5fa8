"""Rotary position embeddings (HF "rotate half" layout), with linear, Llama-3 and LongRoPE
scaling, over all of each head or its leading `rotary_dim` dimensions (partial rotary).

LongRoPE (Phi-3): the table holds the short factors' rows for every position, then the long
factors' rows; a request that may grow past the original context length indexes the long half
at every position (`Batch.rope_offset`), the others the short half. Transformers picks one set
for a whole forward by its longest position, so the two agree on every sequence that stays
within the original context and every prompt already longer than it; they part only on a
sequence that crosses it while it generates, which transformers rotates with the short factors
before the crossing and the long ones after."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from text_generation_server.models.config import RopeConfig


def inv_frequencies(rope: RopeConfig, dim: int, long: bool = False) -> torch.Tensor:
    """[dim // 2] float32: the per-pair rotation frequencies (LongRoPE: the short or `long` set)."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope.kind == "longrope":
        factors = rope.long_factor if long else rope.short_factor
        if len(factors) != dim // 2:
            raise ValueError(f"longrope factors have {len(factors)} entries, the rotary dimension {dim} needs {dim // 2}")
        return inv / torch.tensor(factors, dtype=torch.float32)
    if rope.kind == "linear":
        return inv / rope.factor
    if rope.kind == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


class RotaryEmbedding:
    """Precomputed cos/sin tables indexed by position; `dim` is the rotated part of each head."""

    def __init__(self, rope: RopeConfig, dim: int, max_positions: int, device: torch.device, dtype: torch.dtype):
        pos = torch.arange(max_positions, device=device, dtype=torch.int64).float()
        freqs = pos[:, None] * inv_frequencies(rope, dim).to(device)[None, :]
        if rope.kind == "longrope":  # [short rows; long rows]: 2 x max_positions
            freqs = torch.cat([freqs, pos[:, None] * inv_frequencies(rope, dim, long=True).to(device)[None, :]])
        self.dim = dim
        self.scale = rope.attention_factor  # cos and sin are multiplied by it (LongRoPE)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * self.scale).to(dtype)  # [max_positions, dim], device, fixed
        self.sin = (emb.sin() * self.scale).to(dtype)  # [max_positions, dim], device, fixed
        self._freqs = freqs  # [max_positions, dim / 2] float32 angles, kept off CUDA only
        self._cos_sin: torch.Tensor | None = None
        # [max_positions, dim] float32, device, fixed: cos of each pair's angle, then sin (the fused
        # kernels' table). Built at load on CUDA (never inside a graph capture); on demand elsewhere.
        if device.type == "cuda":
            self.cos_sin_cache()
            self._freqs = None

    def cos_sin_cache(self) -> torch.Tensor:
        if self._cos_sin is None:
            self._cos_sin = torch.cat((self._freqs.cos(), self._freqs.sin()), dim=-1) * self.scale
        return self._cos_sin

    def apply(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, heads, head_dim], k: [T, kv_heads, head_dim], positions: [T] int64; dimensions
        past `dim` pass unrotated."""
        if self.dim < q.shape[-1]:
            r = self.dim
            q2, k2 = self.apply(q[..., :r], k[..., :r], positions)
            return torch.cat((q2, q[..., r:]), dim=-1), torch.cat((k2, k[..., r:]), dim=-1)
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
