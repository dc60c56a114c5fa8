"""Decode steps captured as CUDA graphs, one per batch-size bucket.

A step of n rows replays the smallest bucket >= n: inputs are copied into static buffers, padding
rows feed token 0 at position 0 and write their (ignored) keys to a scratch block outside the
router's blocks, the graph-mode FlashInfer wrapper is re-planned (host work only), and the logits
of the first n rows are returned. Sampling stays outside the graph.

With a LoRA slot table, each bucket is captured twice: without LoRA (base-only steps) and with the
LoRA delta, whose tile plan (Triton kernels) or row order and segment offsets (segment GEMM) are
static buffers refilled per replay; padding rows sit in slot 0 (no delta). Any mix of adapters
and ranks replays the same graph.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from text_generation_server.attention.base import AttentionInputs
from text_generation_server.attention.paged_meta import pick_bucket
from text_generation_server.batch import StepInputs
from text_generation_server.lora.kernels import SlotKernels
from text_generation_server.models.forward_context import ForwardContext, forward_context

log = logging.getLogger(__name__)

class DecodeGraphs:
    def __init__(self, model, attention, cache, buckets: tuple[int, ...], max_pages: int, scratch_block: int,
                 lora: SlotKernels | None = None):
        from text_generation_server.attention.flashinfer import FlashInferAttention

        t0 = time.perf_counter()
        dev = model.device
        self.model, self.cache = model, cache
        self.buckets = sorted(buckets)
        top = self.buckets[-1]
        self.scratch_loc = scratch_block * cache.block_size
        self.input_ids = torch.zeros(top, dtype=torch.int64, device=dev)  # [max bucket], device, copied each replay
        self.positions = torch.zeros(top, dtype=torch.int64, device=dev)  # [max bucket], device, copied each replay
        self.cache_locs = torch.full((top,), self.scratch_loc, dtype=torch.int64, device=dev)  # [max bucket], device
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # Every graph writes its logits into the rows of one buffer (they never run at once).
        self.out = torch.empty(top, model.config.vocab_size, dtype=torch.float32, device=dev)  # [max bucket, vocab]
        self.logits: dict[int, torch.Tensor] = {}  # bucket -> its rows of `out`
        self.backends: dict[int, FlashInferAttention] = {}
        self.lora = lora
        self.lora_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.lora_logits: dict[int, torch.Tensor] = {}
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.buckets):
            be = FlashInferAttention.for_cuda_graph(attention, bs, max_pages, scratch_block)
            be.cache_locs = self.cache_locs[:bs]
            be.plan(_empty_decode())
            self.graphs[bs], self.logits[bs] = self._capture(bs, ForwardContext(be), pool)
            if lora is not None:
                ctx = ForwardContext(be, lora=lora.graph_step(np.zeros(bs, dtype=np.int64)))
                self.lora_graphs[bs], self.lora_logits[bs] = self._capture(bs, ctx, pool)
            self.backends[bs] = be
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s%s in %.1fs", self.buckets,
                 f" (with and without LoRA, {lora.name} kernels)" if lora is not None else "", time.perf_counter() - t0)

    def _capture(self, bs: int, ctx: ForwardContext, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), forward_context(ctx):
            for _ in range(2):
                self._forward(bs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool), forward_context(ctx):
            logits = self._forward(bs)
        return graph, logits

    def _forward(self, bs: int) -> torch.Tensor:
        hidden = self.model.forward(self.input_ids[:bs], self.positions[:bs], self.cache.k, self.cache.v)
        return self.model.compute_logits(hidden, self.out[:bs])

    def run(self, inputs: StepInputs, n: int, row_slots: np.ndarray | None = None) -> torch.Tensor | None:
        """Logits [n, vocab] of a decode step, or None when no bucket holds n rows (or LoRA rows
        come without a captured LoRA graph). `row_slots`: each row's LoRA slot, None if all base."""
        bs = pick_bucket(n, self.buckets)
        if bs is None or (row_slots is not None and not self.lora_graphs):
            return None
        self.input_ids[:n].copy_(inputs.input_ids, non_blocking=True)
        self.positions[:n].copy_(inputs.positions, non_blocking=True)
        self.cache_locs[:n].copy_(inputs.attention.cache_locs, non_blocking=True)
        if bs > n:
            self.input_ids[n:bs].zero_()
            self.positions[n:bs].zero_()
            self.cache_locs[n:bs].fill_(self.scratch_loc)
        self.backends[bs].plan(inputs.attention)
        if row_slots is not None:
            self.lora.graph_step(np.concatenate([row_slots, np.zeros(bs - n, dtype=np.int64)]))
            self.lora_graphs[bs].replay()
            return self.lora_logits[bs][:n]
        self.graphs[bs].replay()
        return self.logits[bs][:n]


def _empty_decode() -> AttentionInputs:
    """A decode step of zero real rows (all padding), to plan before capture."""
    z = torch.zeros(0, dtype=torch.int32)
    return AttentionInputs(
        cu_seqlens_q=z, kv_lens=z, block_tables=z, cache_locs=z.long(), max_q=1, max_kv=1, is_decode=True,
        cu_seqlens_q_host=np.zeros(1, dtype=np.int32), kv_lens_host=np.zeros(0, dtype=np.int32),
        block_tables_host=np.zeros((0, 1), dtype=np.int32),
    )
