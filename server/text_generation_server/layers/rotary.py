"""Rotary position embeddings (HF "rotate half" layout), with linear and Llama-3 scaling."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from text_generation_server.models.config import RopeConfig


def inv_frequencies(rope: RopeConfig, dim: int) -> torch.Tensor:
    """[dim // 2] float32: the per-pair rotation frequencies."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
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
    """Precomputed cos/sin tables indexed by position."""

    def __init__(self, rope: RopeConfig, dim: int, max_positions: int, device: torch.device, dtype: torch.dtype):
        inv = inv_frequencies(rope, dim).to(device)
        pos = torch.arange(max_positions, device=device, dtype=torch.int64).float()
        freqs = pos[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(dtype)  # [max_positions, dim], device, fixed
        self.sin = emb.sin().to(dtype)  # [max_positions, dim], device, fixed
        self._freqs = freqs  # [max_positions, dim / 2] float32 angles, kept off CUDA only
        self._cos_sin: torch.Tensor | None = None
        # [max_positions, dim] float32, device, fixed: cos of each pair's angle, then sin (the fused
        # kernels' table). Built at load on CUDA (never inside a graph capture); on demand elsewhere.
        if device.type == "cuda":
            self.cos_sin_cache()
            self._freqs = None

    def cos_sin_cache(self) -> torch.Tensor:
        if self._cos_sin is None:
            self._cos_sin = torch.cat((self._freqs.cos(), self._freqs.sin()), dim=-1)
        return self._cos_sin

    def apply(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, heads, dim], k: [T, kv_heads, dim], positions: [T] int64."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
