"""The LoRA part of one step: which tokens use which adapter, applied per projection as one
grouped computation per adapter present (a segment of rows each; the base rows are untouched)."""

from __future__ import annotations

import numpy as np
import torch

from text_generation_server.lora.adapter import Adapter


class LoraStep:
    """The grouped torch path (CPU, and the reference on CUDA)."""

    def __init__(self, token_adapters: np.ndarray, adapters: dict[str, Adapter], device: torch.device):
        """token_adapters: [T] adapter name per token of the step ('' = base model)."""
        self.groups: list[tuple[Adapter, torch.Tensor]] = []  # (adapter, token indices [n] int64, device)
        for name in sorted(set(token_adapters.tolist()) - {""}):
            idx = np.flatnonzero(token_adapters == name)
            self.groups.append((adapters[name], torch.from_numpy(idx).to(device, non_blocking=True)))

    def apply(self, layer: int, projs: tuple[str, ...], x: torch.Tensor, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        """ys[i] = x W_i^T (+ b) for all tokens (projection projs[i]); adds scaling * x A^T B^T for
        each adapter's tokens."""
        return [self._apply(layer, proj, x, y) for proj, y in zip(projs, ys)]

    def _apply(self, layer: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for adapter, idx in self.groups:
            w = adapter.weights.get((layer, proj))
            if w is None:
                continue
            a, b = w
            delta = (x.index_select(0, idx) @ a.t()) @ b.t()
            y = y.index_add(0, idx, delta * adapter.scaling)
        return y
