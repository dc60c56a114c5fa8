"""LoRA on CUDA: every resident adapter has a slot in stacked, rank-padded weight tensors, and a
step computes each projection's delta for all rows with two segmented matmuls (shrink x A^T,
expand v B^T) over rows sorted by slot. Shapes depend only on the number of rows and slots, so the
same code runs inside CUDA graphs.

Slot 0 is all zeros: base-model rows (and CUDA-graph padding rows) sit in its segment and get a
zero delta. B is stored pre-multiplied by the adapter's scaling; ranks below `max_rank` are
zero-padded, which leaves the product unchanged.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable

import numpy as np
import torch

from text_generation_server.lora.adapter import PROJECTIONS, Adapter, bad, projection_shapes
from text_generation_server.models.config import ModelConfig

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


class SlotTable:
    """Stacked adapter weights on the device: per (layer, projection) A [S+1, R, in] and
    B [S+1, out, R], slot 0 zero."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, num_slots: int, max_rank: int):
        # A power of two (at least 16): the Triton decode kernels tile the rank whole.
        max_rank = 1 << (max(16, max_rank) - 1).bit_length()
        self.num_slots, self.max_rank, self.device = num_slots, max_rank, device
        shapes = projection_shapes(cfg)
        self.a: dict[tuple[int, str], torch.Tensor] = {}
        self.b: dict[tuple[int, str], torch.Tensor] = {}
        for layer in range(cfg.num_layers):
            for proj in PROJECTIONS:
                out_f, in_f = shapes[proj]
                self.a[(layer, proj)] = torch.zeros(num_slots + 1, max_rank, in_f, dtype=dtype, device=device)
                self.b[(layer, proj)] = torch.zeros(num_slots + 1, out_f, max_rank, dtype=dtype, device=device)
        self._free = list(range(num_slots, 0, -1))
        self._lock = threading.Lock()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.a, self.b) for t in d.values())

    def check(self, host: Adapter) -> None:
        if host.rank > self.max_rank:
            raise bad(host.name, f"rank {host.rank} is above --max-lora-rank {self.max_rank}")

    def take(self) -> int | None:
        with self._lock:
            return self._free.pop() if self._free else None

    def give_back(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def write(self, slot: int, host: Adapter) -> None:
        """Copies a host adapter into `slot` (which no step is using) on a side stream."""
        self.check(host)
        r = host.rank
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            for key, a_all in self.a.items():
                a, b = a_all[slot], self.b[key][slot]
                w = host.weights.get(key)
                if w is None:
                    a.zero_()
                    b.zero_()
                    continue
                ha, hb = w
                hb = hb * host.scaling
                if stream is not None:
                    ha, hb = ha.pin_memory(), hb.pin_memory()
                a[r:].zero_()
                b[:, r:].zero_()
                a[:r].copy_(ha, non_blocking=True)
                b[:, :r].copy_(hb, non_blocking=True)
        if stream is not None:
            stream.synchronize()


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
            self.perm = torch.from_numpy(order).to(dev)  # [T] int64: sorted position -> token
            self.indptr = torch.from_numpy(self.indptr_host).to(dev)  # [S+2] int64
        else:  # static buffers of a captured graph
            perm_buf[: len(order)].copy_(torch.from_numpy(order), non_blocking=True)
            indptr_buf.copy_(torch.from_numpy(self.indptr_host), non_blocking=True)
            self.perm, self.indptr = perm_buf[: len(order)], indptr_buf

    def apply(self, layer: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        key = (layer, proj)
        xs = x.index_select(0, self.perm)
        v = self.matmul(xs, self.table.a[key], self.n, self.indptr, self.indptr_host)
        d = self.matmul(v, self.table.b[key], self.n, self.indptr, self.indptr_host)
        return y.index_add(0, self.perm, d)
