"""How a step computes the LoRA delta over the CUDA slot table: one strategy object per engine,
chosen once (TESSERA_LORA_KERNEL), instead of the kernel's name compared wherever a step is built.

- `TritonKernels` (default): our grouped shrink/expand kernels (`triton_lora.py`), compiled at warmup.
- `SegmentKernels`: FlashInfer's segment GEMM over rows sorted by slot (`segment.py`), built at warmup.

Each gives an eager step's LoRA (`step`) and a captured decode step's (`graph_step`), whose plan
lives in static buffers of the strategy that every replay refills; graphs are captured from the
largest bucket down, so the first `graph_step` sizes the shared buffers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from text_generation_server.lora.segment import SegmentLoraStep
from text_generation_server.lora.slots import SlotTable
from text_generation_server.lora.triton_lora import DECODE_BLOCK_M, PREFILL_BLOCK_M, TritonLoraStep, compile_kernels


class SlotKernels(ABC):
    name: str

    def __init__(self, table: SlotTable):
        self.table = table

    def compile(self, dtype: torch.dtype) -> None:
        """Compiles what eager steps launch (at warmup, not while serving)."""

    @abstractmethod
    def step(self, row_slots: np.ndarray, prefill: bool):
        """The LoRA of an eager step; `row_slots[i]`: token i's slot (0 = base)."""

    @abstractmethod
    def graph_step(self, row_slots: np.ndarray):
        """The LoRA of a captured decode step of len(row_slots) rows (the bucket), over static buffers."""


class TritonKernels(SlotKernels):
    name = "triton"

    def __init__(self, table: SlotTable):
        super().__init__(table)
        self._plans: dict[int, torch.Tensor] = {}  # bucket -> [4, bucket] int32 tile plan (plan_tiles)

    def compile(self, dtype: torch.dtype) -> None:
        compile_kernels(self.table, dtype)

    def step(self, row_slots: np.ndarray, prefill: bool) -> TritonLoraStep:
        # larger tiles for prefills, where a prompt's tokens share an adapter
        return TritonLoraStep(self.table, row_slots, PREFILL_BLOCK_M if prefill else DECODE_BLOCK_M)

    def graph_step(self, row_slots: np.ndarray) -> TritonLoraStep:
        n = len(row_slots)
        if n not in self._plans:
            self._plans[n] = torch.zeros(4, n, dtype=torch.int32, device=self.table.device)
        return TritonLoraStep(self.table, row_slots, DECODE_BLOCK_M, self._plans[n])


class SegmentKernels(SlotKernels):
    name = "segment"

    def __init__(self, table: SlotTable, backend: str):
        from text_generation_server.lora.segment import FlashInferSegmentMatmul

        super().__init__(table)
        self.matmul = FlashInferSegmentMatmul(table.device, backend)
        self._perm: torch.Tensor | None = None  # [largest bucket] int64: rows sorted by slot
        self._indptr = torch.zeros(table.num_slots + 2, dtype=torch.int64, device=table.device)  # segment offsets

    def compile(self, dtype: torch.dtype) -> None:
        # FlashInfer builds its segment GEMM on first use; on Hopper its CUTLASS group GEMMs took
        # over five minutes on a fresh H200. Without CUDA graphs (whose capture would launch it) the
        # first request with an adapter would wait for that.
        self.table.launch_every_group(self.step(np.ones(1, dtype=np.int64), True), 1, dtype)

    def step(self, row_slots: np.ndarray, prefill: bool) -> SegmentLoraStep:
        return SegmentLoraStep(self.table, row_slots, self.matmul)

    def graph_step(self, row_slots: np.ndarray) -> SegmentLoraStep:
        if self._perm is None:
            self._perm = torch.zeros(len(row_slots), dtype=torch.int64, device=self.table.device)
        assert len(row_slots) <= len(self._perm), "capture the largest bucket first"
        return SegmentLoraStep(self.table, row_slots, self.matmul, self._perm, self._indptr)


def make_slot_kernels(name: str, table: SlotTable, segment_backend: str = "auto") -> SlotKernels:
    if name == "triton":
        return TritonKernels(table)
    if name == "segment":
        return SegmentKernels(table, segment_backend)
    raise ValueError(f"unknown LoRA kernels {name!r}")
