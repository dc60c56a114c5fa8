"""Linear projections. Every projection a LoRA adapter may target goes through here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from text_generation_server.models.forward_context import current_context


class Linear:
    """One projection, or several of the same input (q/k/v; gate/up; `lora.adapter.GROUPS`).

    On CUDA a group is one GEMM over the concatenated weights, and its outputs are column views
    of one tensor (the LoRA kernels add into it in place). Elsewhere each projection is its own
    GEMM, bit for bit what separate layers compute."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None] | None, names: tuple[str, ...],
                 layer: int = -1):
        biases = biases or [None] * len(weights)
        self.names = names  # projection names (q_proj, ..., down_proj), used by LoRA
        self.layer = layer  # decoder layer index, used by LoRA
        self.sizes = [w.shape[0] for w in weights]
        self.fused = len(weights) > 1 and weights[0].is_cuda
        if self.fused:
            self.weight = torch.cat(weights)  # [sum out, in], device, fixed
            self.bias = None
            if any(b is not None for b in biases):
                self.bias = torch.cat([b if b is not None else weights[i].new_zeros(self.sizes[i])
                                       for i, b in enumerate(biases)])
            self.parts = []
        else:
            self.parts = list(zip(weights, biases))  # [(weight [out, in], bias [out] or None)]

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.fused:
            ys = list(F.linear(x, self.weight, self.bias).split(self.sizes, dim=1))
        else:
            ys = [F.linear(x, w, b) for w, b in self.parts]
        ctx = current_context()
        if ctx is not None and ctx.lora is not None:
            ys = ctx.lora.apply(self.layer, self.names, x, ys)
        return ys
