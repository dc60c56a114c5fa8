"""Linear projections. Every projection a LoRA adapter may target goes through here."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from text_generation_server.layers.cpu_gemm import packed_linear
from text_generation_server.models.forward_context import current_context


class Linear:
    """One projection, or several of the same input (q/k/v; gate/up; `lora.adapter.GROUPS`).

    On CUDA a group is one GEMM over the concatenated weights, and its outputs are column views
    of one tensor (the LoRA kernels add into it in place). Elsewhere each projection is its own
    GEMM (on the CPU through a packed weight, `cpu_gemm`)."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None] | None, names: tuple[str, ...],
                 layer: int = -1):
        biases = biases or [None] * len(weights)
        self.names = names  # projection names (q_proj, ..., down_proj), used by LoRA
        self.layer = layer  # decoder layer index, used by LoRA; -1: not a LoRA target
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
            # One GEMM per projection: through a packed weight on the CPU (`cpu_gemm`), else F.linear.
            self.parts = [packed_linear(w, b) or functools.partial(F.linear, weight=w, bias=b)
                          for w, b in zip(weights, biases)]

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.fused:
            ys = list(F.linear(x, self.weight, self.bias).split(self.sizes, dim=1))
        else:
            ys = [gemm(x) for gemm in self.parts]
        ctx = current_context()
        if ctx is not None and ctx.lora is not None and self.layer >= 0:
            ys = ctx.lora.apply(self.layer, self.names, x, ys)
        return ys
