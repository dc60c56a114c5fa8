"""LoRA for decode steps on CUDA: two Triton kernels per projection over the SlotTable, one program
per row (shrink) or per row and output block (expand), each reading its row's slot.

Rows need no sorting and no scatter: the expand kernel adds into the base projection's output in
place, and rows of slot 0 (base model, CUDA-graph padding) return at once. Shapes depend only on
the number of rows, so the kernels are captured in the decode CUDA graphs. Prefill steps, where
many tokens share an adapter, use the segment GEMM instead (segment.py).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl


@triton.jit
def _shrink(x_ptr, a_ptr, slot_ptr, v_ptr, x_stride, a_slot_stride,
            D_IN: tl.constexpr, R: tl.constexpr, BLOCK_K: tl.constexpr):
    """v[t, :] = x[t, :] @ A[slot[t]]^T, in fp32 (A: [S+1, R, d_in])."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot == 0:
        return
    r = tl.arange(0, R)
    acc = tl.zeros((R,), dtype=tl.float32)
    a_row = a_ptr + slot.to(tl.int64) * a_slot_stride + r[:, None] * D_IN
    for k0 in range(0, D_IN, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = k < D_IN
        x = tl.load(x_ptr + t.to(tl.int64) * x_stride + k, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(a_row + k[None, :], mask=mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)
    tl.store(v_ptr + t * R + r, acc)


@triton.jit
def _expand(v_ptr, b_ptr, slot_ptr, y_ptr, y_stride, b_slot_stride,
            D_OUT: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[t, n-block] += v[t, :] @ B[slot[t]][n-block, :]^T (B: [S+1, d_out, R], pre-scaled)."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot == 0:
        return
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = n < D_OUT
    r = tl.arange(0, R)
    v = tl.load(v_ptr + t * R + r)
    b = tl.load(b_ptr + slot.to(tl.int64) * b_slot_stride + n[:, None] * R + r[None, :], mask=mask[:, None], other=0.0)
    delta = tl.sum(b.to(tl.float32) * v[None, :], axis=1)
    y_at = y_ptr + t.to(tl.int64) * y_stride + n
    y = tl.load(y_at, mask=mask, other=0.0)
    tl.store(y_at, (y.to(tl.float32) + delta).to(y.dtype), mask=mask)


class TritonLoraStep:
    """The LoRA part of a decode step on a SlotTable. `row_slots[i]`: row i's slot (0 = base)."""

    def __init__(self, table, row_slots: np.ndarray, slots_buf: torch.Tensor | None = None):
        self.table = table
        r = table.max_rank
        assert r & (r - 1) == 0, "the slot table's rank must be a power of two"
        self.block_k = max(32, 2048 // r)
        host = torch.from_numpy(np.ascontiguousarray(row_slots, dtype=np.int64))
        if slots_buf is None:
            self.slots = host.to(table.device)  # [T] int64
        else:  # the static buffer of a captured graph
            slots_buf[: len(host)].copy_(host, non_blocking=True)
            self.slots = slots_buf[: len(host)]

    def apply(self, layer: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        key = (layer, proj)
        a, b = self.table.a[key], self.table.b[key]
        t, r = x.shape[0], self.table.max_rank
        if t == 0:
            return y
        if x.stride(1) != 1:
            x = x.contiguous()
        assert y.stride(1) == 1, "the delta is added into y in place"
        v = torch.empty(t, r, dtype=torch.float32, device=x.device)
        _shrink[(t,)](x, a, self.slots, v, x.stride(0), a.stride(0), D_IN=a.shape[2], R=r, BLOCK_K=self.block_k)
        d_out = b.shape[1]
        _expand[(t, triton.cdiv(d_out, 64))](v, b, self.slots, y, y.stride(0), b.stride(0), D_OUT=d_out, R=r, BLOCK_N=64)
        return y
