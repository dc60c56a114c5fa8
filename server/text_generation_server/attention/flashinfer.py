"""FlashInfer attention (CUDA only; `flashinfer` is imported here and nowhere else).

Planned once per step for all layers, once per distinct window of the model's layers:
- decode: BatchDecodeWithPagedKVCacheWrapper with tensor cores (GQA), over the paged cache;
- prefill of fresh prompts: BatchPrefillWithRaggedKVCacheWrapper over the new keys/values
  (they are written to the cache too, for later steps);
- prefill with a cached prefix: BatchPrefillWithPagedKVCacheWrapper over the paged cache.
A graph-mode instance (`for_cuda_graph`) serves one captured decode batch size; its wrappers (one
per window) share the fixed page-table buffers, which hold the same pages for every window.
"""

from __future__ import annotations

import numpy as np
import torch

import flashinfer

from text_generation_server.attention.base import AttentionBackend, AttentionInputs
from text_generation_server.attention.paged_meta import paged_kv_metadata, pad_decode_metadata

WORKSPACE_BYTES = 256 * 1024 * 1024


class FlashInferAttention(AttentionBackend):
    name = "flashinfer"
    plans_pages_on_host = True

    def __init__(self, num_heads, num_kv_heads, head_dim, block_size, windows=(None,), scale=None, softcap=None, *,
                 device: torch.device, dtype: torch.dtype, workspace: torch.Tensor | None = None):
        super().__init__(num_heads, num_kv_heads, head_dim, block_size, windows, scale, softcap)
        self.device, self.dtype = device, dtype
        self.workspace = workspace if workspace is not None else torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        # window -> its wrappers (the float workspace is scratch of one run at a time: shared)
        self.decode = {w: flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD", use_tensor_cores=True)
                       for w in self.windows}
        self.ragged = {w: flashinfer.BatchPrefillWithRaggedKVCacheWrapper(self.workspace, "NHD") for w in self.windows}
        self.paged = {w: flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD") for w in self.windows}
        self.mode = ""
        self.cache_locs: torch.Tensor | None = None  # [T] int64, device, set each plan
        self.graph_batch_size = 0  # >0: a graph-mode instance for this decode batch size
        self.scratch_block = 0
        self._planned: torch.cuda.Event | None = None  # recorded after the last plan's copies

    @classmethod
    def for_cuda_graph(cls, parent: "FlashInferAttention", batch_size: int, max_pages: int, scratch_block: int) -> "FlashInferAttention":
        """A decode-only instance with fixed buffers, capturable in a CUDA graph of `batch_size` rows."""
        self = cls.__new__(cls)
        AttentionBackend.__init__(self, parent.num_heads, parent.num_kv_heads, parent.head_dim, parent.block_size,
                                  parent.windows, parent.scale, parent.softcap)
        self.device, self.dtype, self.workspace = parent.device, parent.dtype, parent.workspace
        dev = parent.device
        self.indptr_buf = torch.zeros(batch_size + 1, dtype=torch.int32, device=dev)
        self.indices_buf = torch.zeros(batch_size * max_pages, dtype=torch.int32, device=dev)
        self.last_buf = torch.zeros(batch_size, dtype=torch.int32, device=dev)
        self.decode = {w: flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True,
            paged_kv_indptr_buffer=self.indptr_buf, paged_kv_indices_buffer=self.indices_buf,
            paged_kv_last_page_len_buffer=self.last_buf,
        ) for w in self.windows}
        self.mode = "decode"
        self.cache_locs = None
        self.graph_batch_size = batch_size
        self.scratch_block = scratch_block
        self._planned = None
        return self

    def supports_cuda_graphs(self) -> bool:
        return True

    def _common(self, w: int | None) -> dict:
        """The plan arguments every wrapper shares: window, scale, soft cap, dtypes."""
        return dict(window_left=w - 1 if w else -1, logits_soft_cap=self.softcap, sm_scale=self.scale,
                    q_data_type=self.dtype, kv_data_type=self.dtype)

    def _plan_decode(self, indptr, indices, last):
        indptr, last = torch.from_numpy(indptr), torch.from_numpy(last)
        indices = torch.from_numpy(indices).to(self.device, non_blocking=True)
        for w, wrapper in self.decode.items():
            wrapper.plan(indptr, indices, last, self.num_heads, self.num_kv_heads, self.head_dim, self.block_size,
                         pos_encoding_mode="NONE", **self._common(w))

    def plan(self, inputs: AttentionInputs) -> None:
        # FlashInfer's plan writes its metadata into a pinned host buffer of the wrapper and copies
        # it to the device in stream order. With overlapped steps the previous plan's copy may not
        # have run yet when the next plan starts: wait for it (it is normally long done).
        if self._planned is not None:
            self._planned.synchronize()
        self._plan(inputs)
        if self._planned is None:
            self._planned = torch.cuda.Event()
        self._planned.record()

    def _plan(self, inputs: AttentionInputs) -> None:
        cu = inputs.cu_seqlens_q_host
        kv_lens = inputs.kv_lens_host
        tables = inputs.block_tables_host
        if not self.graph_batch_size:  # a graph-mode instance keeps its static cache_locs buffer
            self.cache_locs = inputs.cache_locs
        if inputs.is_decode:
            indptr, indices, last = inputs.paged_host or paged_kv_metadata(kv_lens, tables, self.block_size)
            if self.graph_batch_size:
                indptr, indices, last = pad_decode_metadata(indptr, indices, last, self.graph_batch_size, self.scratch_block)
            self._plan_decode(indptr, indices, last)
            self.mode = "decode"
            return
        q_lens = np.diff(cu)
        qo = torch.from_numpy(cu.astype(np.int32))
        if np.array_equal(q_lens, kv_lens):
            for w, wrapper in self.ragged.items():
                wrapper.plan(qo, qo, self.num_heads, self.num_kv_heads, self.head_dim, causal=True, **self._common(w))
            self.mode = "ragged"
            return
        indptr, indices, last = paged_kv_metadata(kv_lens, tables, self.block_size)
        indptr, last, indices = torch.from_numpy(indptr), torch.from_numpy(last), torch.from_numpy(indices).to(self.device)
        for w, wrapper in self.paged.items():
            wrapper.plan(qo, indptr, indices, last, self.num_heads, self.num_kv_heads, self.head_dim, self.block_size,
                         causal=True, **self._common(w))
        self.mode = "paged"

    def forward(self, q, k, v, k_cache, v_cache, window=None):
        if self.mode == "decode":
            return self.decode[window].run(q, (k_cache, v_cache))
        if self.mode == "ragged":
            return self.ragged[window].run(q, k, v.contiguous())  # v may be a column view of the fused q/k/v output
        return self.paged[window].run(q, (k_cache, v_cache))
