"""Reference attention in plain torch: the CPU backend and the oracle in tests.

Sequences are padded to [B, max_q] queries and [B, max_kv] keys gathered from the paged
cache through the block tables; one masked SDPA call covers prefill, decode and mixed steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from text_generation_server.attention.base import AttentionBackend, AttentionInputs


class TorchAttention(AttentionBackend):
    name = "torch"

    def plan(self, inputs: AttentionInputs) -> None:
        dev = inputs.cu_seqlens_q.device
        cu = inputs.cu_seqlens_q.long()
        q_lens = cu[1:] - cu[:-1]  # [B]
        kv_lens = inputs.kv_lens.long()  # [B]
        b = q_lens.shape[0]
        max_q, max_kv = inputs.max_q, inputs.max_kv
        t = int(cu[-1])
        row = torch.repeat_interleave(torch.arange(b, device=dev), q_lens, output_size=t)  # [T]
        col = torch.arange(t, device=dev) - cu[:-1][row]
        self._pad_index = row * max_q + col  # [T] position of each token in the padded [B*max_q]
        self._b, self._max_q = b, max_q

        # Absolute position of each padded query and key.
        qi = torch.arange(max_q, device=dev)[None, :] + (kv_lens - q_lens)[:, None]  # [B, max_q]
        kj = torch.arange(max_kv, device=dev)[None, :]  # [1, max_kv]
        mask = (kj[:, None, :] <= qi[:, :, None]) & (kj[:, None, :] < kv_lens[:, None, None])
        if self.sliding_window is not None:
            mask &= kj[:, None, :] > qi[:, :, None] - self.sliding_window
        # Padding query rows attend to key 0 so softmax stays finite; their output is dropped.
        pad_rows = torch.arange(max_q, device=dev)[None, :] >= q_lens[:, None]
        mask[..., 0] |= pad_rows
        self._mask = mask[:, None]  # [B, 1, max_q, max_kv]

        bs = self.block_size
        blk = inputs.block_tables.long()[:, torch.clamp(kj[0] // bs, max=inputs.block_tables.shape[1] - 1)]
        self._gather = (blk * bs + kj % bs).reshape(-1)  # [B * max_kv] cache slots
        self.slots = inputs.slots
        self._max_kv = max_kv

    def forward(self, q, k, v, k_cache, v_cache):
        nb, bs, kvh, d = k_cache.shape
        # index_select, not advanced indexing: 3.5x faster gathers on the CPU (the step's largest
        # non-GEMM cost at batch 16).
        keys = k_cache.view(nb * bs, kvh, d).index_select(0, self._gather).view(self._b, self._max_kv, kvh, d).transpose(1, 2)
        vals = v_cache.view(nb * bs, kvh, d).index_select(0, self._gather).view(self._b, self._max_kv, kvh, d).transpose(1, 2)
        h = q.shape[1]
        qp = q.new_zeros(self._b * self._max_q, h, d)
        qp[self._pad_index] = q
        qp = qp.view(self._b, self._max_q, h, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            qp, keys.to(q.dtype), vals.to(q.dtype), attn_mask=self._mask, enable_gqa=h != kvh
        )
        return out.transpose(1, 2).reshape(self._b * self._max_q, h, d)[self._pad_index]
