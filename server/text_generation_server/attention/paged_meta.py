"""Page-table metadata in FlashInfer's CSR form, built on the host with numpy (no per-row loop)."""

from __future__ import annotations

import numpy as np


def paged_kv_metadata(kv_lens: np.ndarray, block_tables: np.ndarray, page_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """kv_lens: [B] tokens per sequence; block_tables: [B, max_blocks] page ids (row-padded).
    Returns (indptr [B+1] int32, indices [sum pages] int32, last_page_len [B] int32)."""
    kv_lens = np.asarray(kv_lens, dtype=np.int64)
    pages = (kv_lens + page_size - 1) // page_size
    if (pages > block_tables.shape[1]).any():
        raise ValueError("a sequence is longer than its block table")
    indptr = np.zeros(len(kv_lens) + 1, dtype=np.int32)
    np.cumsum(pages, out=indptr[1:])
    used = np.arange(block_tables.shape[1])[None, :] < pages[:, None]
    indices = block_tables[used].astype(np.int32)  # row-major: each row's pages in order
    last = (kv_lens - (pages - 1) * page_size).astype(np.int32)
    return indptr, indices, last


def pick_bucket(batch_size: int, buckets: list[int]) -> int | None:
    """The smallest captured batch size that holds `batch_size`, or None (run eagerly)."""
    for b in sorted(buckets):
        if b >= batch_size:
            return b
    return None


def pad_decode_metadata(indptr: np.ndarray, indices: np.ndarray, last: np.ndarray, bucket: int, scratch_block: int):
    """Extends decode metadata to `bucket` rows; padding rows read one token of the scratch block."""
    pad = bucket - (len(indptr) - 1)
    if pad <= 0:
        return indptr, indices, last
    indptr = np.concatenate([indptr, indptr[-1] + np.arange(1, pad + 1, dtype=np.int32)])
    indices = np.concatenate([indices, np.full(pad, scratch_block, dtype=np.int32)])
    last = np.concatenate([last, np.ones(pad, dtype=np.int32)])
    return indptr, indices, last
