"""Linear layers on the CPU: oneDNN with each weight reordered into its blocked layout once, at
load. `F.linear` re-reads a [out, in] weight in its plain layout on every call, which on the CI
machine takes 2-3x as long at 16 rows or a prefill's hundreds, and ~5x for the vocabulary
projection (benchmarks: docs/benchmarks.md, 2026-12-01 CPU). The results equal `F.linear`'s to
float32 rounding (a different summation order)."""

from __future__ import annotations

from typing import Callable

import torch

# Rows the packed layout is tuned for (a decode batch); any row count works.
_ROWS_HINT = 16


def packed_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """x [N, in] -> x weight^T (+ bias) [N, out] through a packed weight, or None where that does
    not apply (not CPU float32, or this torch build has no oneDNN linear)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return None
    packed = ops._reorder_linear_weight(weight, _ROWS_HINT)  # [out, in], oneDNN layout, fixed

    def linear(x: torch.Tensor) -> torch.Tensor:
        return ops._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")

    return linear
