"""Linear projections. Every projection a LoRA adapter may target goes through here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from text_generation_server.models.forward_context import current_context


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, name: str = "", layer: int = -1):
        self.weight = weight  # [out, in], device, fixed
        self.bias = bias  # [out] or None
        self.name = name  # projection name (q_proj, ..., down_proj), used by LoRA
        self.layer = layer  # decoder layer index, used by LoRA

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        ctx = current_context()
        if ctx is not None and ctx.lora is not None:
            y = ctx.lora.apply(self.layer, self.name, x, y)
        return y
