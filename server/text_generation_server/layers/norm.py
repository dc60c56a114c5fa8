"""RMSNorm: a weight and an epsilon; the arithmetic is the layer ops' (`layers/ops.py`, float32
inside like the reference implementation, one kernel on CUDA)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from text_generation_server.layers.ops import TorchOps


class RMSNorm:
    """`gemma`: Gemma's variant, scaled by (1 + weight) in float32."""

    def __init__(self, weight: torch.Tensor, eps: float, gemma: bool = False):
        self.weight = weight  # [hidden], device, fixed
        self.eps = eps
        self.gemma = gemma

    def __call__(self, x: torch.Tensor, ops: TorchOps) -> torch.Tensor:
        if self.gemma:
            return ops.gemma_rmsnorm(x, self.weight, self.eps)
        return ops.rmsnorm(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, residual: torch.Tensor, ops: TorchOps) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x)."""
        if self.gemma:
            return ops.gemma_add_rmsnorm(x, residual, self.weight, self.eps)
        return ops.add_rmsnorm(x, residual, self.weight, self.eps)
