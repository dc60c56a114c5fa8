"""Linear projections. Every projection a LoRA adapter may target goes through here."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, name: str = ""):
        self.weight = weight  # [out, in], device, fixed
        self.bias = bias  # [out] or None
        self.name = name  # projection name (q_proj, ..., down_proj), used by LoRA

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
