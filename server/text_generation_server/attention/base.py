"""The attention backend interface.

A backend is planned once per step (`plan`) from the step's ragged layout, which gives the new
tokens' `cache_locs` (the layer writes its keys/values there, fused with the rotary embedding),
then called once per layer (`forward`) to attend over the paged cache. This is FlashInfer's
plan-once / run-per-layer shape; the torch reference follows it too.

Layers may differ in their attention window (Mistral's sliding window on every layer; Gemma's
sliding and global layers alternating): the backend plans each distinct window of the model
(`windows`) and a layer names its own in `forward`. The cache keeps every token of every layer;
a window only masks what a query reads. The softmax scale and Gemma 2's score soft-capping are
the model's, the same for all layers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class AttentionInputs:
    """The ragged layout of one step, built by the batch. All tensors on the model's device."""

    cu_seqlens_q: torch.Tensor  # [B + 1] int32, query token offsets per sequence, rebuilt each step
    kv_lens: torch.Tensor  # [B] int32, tokens in the cache per sequence after this step's writes
    block_tables: torch.Tensor  # [B, max_blocks] int32, KV block ids per sequence (0-padded)
    cache_locs: torch.Tensor  # [T] int64, where each new token goes in the flattened cache (block * block_size + offset)
    max_q: int  # longest query of the step
    max_kv: int  # longest kv_len of the step
    is_decode: bool  # every sequence has exactly one query token
    # Host copies for backends that plan on the CPU (FlashInfer), built with the device ones.
    cu_seqlens_q_host: np.ndarray | None = None  # [B + 1] int32
    kv_lens_host: np.ndarray | None = None  # [B] int32
    block_tables_host: np.ndarray | None = None  # [B, max_blocks] int32
    # Decode only: FlashInfer's page CSR (indptr, indices, last_page_len), when the batch built it
    # ahead, while the previous step ran on the GPU.
    paged_host: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


class AttentionBackend(ABC):
    name: str = "abstract"
    plans_pages_on_host: bool = False  # plan() reads AttentionInputs.paged_host when given

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                 windows: tuple[int | None, ...] = (None,), scale: float | None = None, softcap: float | None = None):
        self.cache_locs: torch.Tensor | None = None  # [T] int64: the planned step's cache location per new token
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.windows = tuple(sorted(set(windows), key=lambda w: w or 0))  # distinct windows (None: whole context)
        self.scale = scale if scale is not None else head_dim ** -0.5  # softmax scale of q.k
        self.softcap = softcap  # scores become softcap * tanh(score / softcap); None: as they are

    @abstractmethod
    def plan(self, inputs: AttentionInputs) -> None:
        """Prepare per-step state shared by all layers."""

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
        window: int | None = None,
    ) -> torch.Tensor:
        """q: [T, heads, dim]; k, v: [T, kv_heads, dim]; caches: [num_blocks, block_size, kv_heads, dim].
        The layer has already written k/v at the planned `cache_locs` (`ops.rope_store`); a query reads
        the last `window` tokens up to itself (one of `windows`; None: all). Returns [T, heads, dim]."""

    # CUDA-graph hooks (decode). Backends that cannot be captured keep the defaults.
    def supports_cuda_graphs(self) -> bool:
        return False


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_locs: torch.Tensor) -> None:
    """Scatter new keys/values into the paged cache at their locations."""
    nb, bs, h, d = k_cache.shape
    k_cache.view(nb * bs, h, d).index_copy_(0, cache_locs, k.to(k_cache.dtype))
    v_cache.view(nb * bs, h, d).index_copy_(0, cache_locs, v.to(v_cache.dtype))
