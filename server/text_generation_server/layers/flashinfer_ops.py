"""`layers/ops.TorchOps` in one kernel each, FlashInfer's or ours (CUDA only; imported by `ops.make_ops`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

import flashinfer

from text_generation_server.layers.ops import TorchOps, joined
from text_generation_server.layers.rope_store import rope_store

if TYPE_CHECKING:
    from text_generation_server.layers.rotary import RotaryEmbedding


class FlashInferOps(TorchOps):
    name = "flashinfer"

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return flashinfer.norm.rmsnorm(x.contiguous(), weight, eps)

    def add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _in_place(flashinfer.norm.fused_add_rmsnorm, x, residual, weight, eps)

    def gemma_rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return flashinfer.norm.gemma_rmsnorm(x.contiguous(), weight, eps)

    def gemma_add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _in_place(flashinfer.norm.gemma_fused_add_rmsnorm, x, residual, weight, eps)

    def rope(self, rotary: RotaryEmbedding, q: torch.Tensor, k: torch.Tensor,
             positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # One kernel reads the (strided) q/k views and writes rotated, contiguous copies.
        return flashinfer.rope.apply_rope_with_cos_sin_cache(
            positions, q, k, q.shape[-1], rotary.cos_sin_cache(), is_neox=True)

    def rope_store(self, rotary: RotaryEmbedding, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   positions: torch.Tensor, cache_locs: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # One kernel instead of three (rotary, then two scatters into the cache).
        return rope_store(q, k, v, rotary.cos_sin_cache(), positions, cache_locs, k_cache, v_cache)

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return flashinfer.activation.silu_and_mul(joined(gate, up))

    def gelu_tanh_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return flashinfer.activation.gelu_tanh_and_mul(joined(gate, up))


def _in_place(kernel, x, residual, weight, eps):
    """A fused add + norm in place: residual += x, then x = norm(residual). Both are this step's
    own buffers (sublayer outputs and the residual stream), so overwriting them is safe."""
    x = x.contiguous()
    kernel(x, residual, weight, eps)
    return x, residual
