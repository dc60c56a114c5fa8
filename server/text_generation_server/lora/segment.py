"""LoRA on CUDA with FlashInfer's segment GEMM (the alternative to triton_lora.py, chosen with
TESSERA_LORA_KERNEL=segment): rows sorted by slot, then two segmented matmuls over the SlotTable
per projection group, shrink x A^T for the whole group and expand v_g B^T per projection. The
argument setup runs on the device, so the same code runs inside CUDA graphs.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from text_generation_server.lora.slots import SlotTable

# (x [T, in], w [S, out, in], num segments, seg_indptr [S+1] device int64, seg_indptr host) -> [T, out]
SegmentMatmul = Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor, np.ndarray], torch.Tensor]


def torch_segment_matmul(x: torch.Tensor, w: torch.Tensor, n: int, indptr: torch.Tensor, indptr_host: np.ndarray) -> torch.Tensor:
    """Reference: one matmul per non-empty segment (host indptr; not graph-safe)."""
    out = torch.zeros(x.shape[0], w.shape[1], dtype=x.dtype, device=x.device)
    for s in range(n):
        lo, hi = int(indptr_host[s]), int(indptr_host[s + 1])
        if hi > lo:
            out[lo:hi] = x[lo:hi] @ w[s].t()
    return out


class FlashInferSegmentMatmul:
    """FlashInfer's segment GEMM (CUTLASS grouped GEMM; SM90 kernels on Hopper). Device-side
    argument setup, so it can be captured in a CUDA graph."""

    def __init__(self, device: torch.device, backend: str = "auto"):
        from flashinfer.gemm import SegmentGEMMWrapper

        self.workspace = torch.empty(32 * 1024 * 1024, dtype=torch.int8, device=device)
        self.wrapper = SegmentGEMMWrapper(self.workspace, backend=backend)

    def __call__(self, x, w, n, indptr, indptr_host):
        return self.wrapper.run(x, w, n, True, seg_indptr=indptr)


class SegmentLoraStep:
    """The LoRA part of one step on a SlotTable. `row_slots[i]` is token i's slot (0 = base)."""

    def __init__(self, table: SlotTable, row_slots: np.ndarray, matmul: SegmentMatmul,
                 perm_buf: torch.Tensor | None = None, indptr_buf: torch.Tensor | None = None):
        self.table, self.matmul = table, matmul
        self.n = table.num_slots + 1
        order = np.argsort(row_slots, kind="stable").astype(np.int64)
        counts = np.bincount(row_slots.astype(np.int64), minlength=self.n)
        self.indptr_host = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        dev = table.device
        if perm_buf is None:
            self.perm = torch.from_numpy(order).to(dev, non_blocking=True)  # [T] int64: sorted position -> token
            self.indptr = torch.from_numpy(self.indptr_host).to(dev, non_blocking=True)  # [S+2] int64
        else:  # static buffers of a captured graph
            perm_buf[: len(order)].copy_(torch.from_numpy(order), non_blocking=True)
            indptr_buf.copy_(torch.from_numpy(self.indptr_host), non_blocking=True)
            self.perm, self.indptr = perm_buf[: len(order)], indptr_buf

    def apply(self, layer: int, projs: tuple[str, ...], x: torch.Tensor, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        key = (layer, projs)
        r, cols = self.table.max_rank, self.table.cols[projs]
        xs = x.index_select(0, self.perm)
        v = self.matmul(xs, self.table.a[key], self.n, self.indptr, self.indptr_host)  # [T, G*R]
        out = []
        for i, y in enumerate(ys):
            # B's slots are contiguous only whole: this expands into every column of the group and
            # keeps projection i's (G times the FLOPs of a tiny GEMM).
            vi = v[:, i * r:(i + 1) * r].contiguous() if len(ys) > 1 else v
            d = self.matmul(vi, self.table.b[key], self.n, self.indptr, self.indptr_host)
            out.append(y.index_add(0, self.perm, d[:, cols[i]:cols[i + 1]]))
        return out
