"""FlashInfer plan metadata and CUDA-graph bucket choice, built on the host (no GPU needed)."""

from __future__ import annotations

import numpy as np
import pytest

from text_generation_server.attention.paged_meta import paged_kv_metadata, pad_decode_metadata, pick_bucket


def test_csr_page_table():
    tables = np.array([[7, 3, 9], [4, 0, 0], [5, 6, 0]], dtype=np.int32)
    indptr, indices, last = paged_kv_metadata(np.array([33, 16, 17]), tables, 16)
    assert indptr.tolist() == [0, 3, 4, 6]
    assert indices.tolist() == [7, 3, 9, 4, 5, 6]
    assert last.tolist() == [1, 16, 1]
    assert indptr.dtype == indices.dtype == last.dtype == np.int32


def test_too_short_table_is_refused():
    with pytest.raises(ValueError):
        paged_kv_metadata(np.array([40]), np.array([[1, 2]], dtype=np.int32), 16)


def test_bucket_choice():
    buckets = [1, 2, 4, 8, 16, 32]
    assert pick_bucket(1, buckets) == 1
    assert pick_bucket(3, buckets) == 4
    assert pick_bucket(32, buckets) == 32
    assert pick_bucket(33, buckets) is None


def test_padding_rows_read_the_scratch_block():
    indptr, indices, last = paged_kv_metadata(np.array([5, 20]), np.array([[2, 0], [3, 8]], dtype=np.int32), 16)
    p_indptr, p_indices, p_last = pad_decode_metadata(indptr, indices, last, 4, scratch_block=99)
    assert p_indptr.tolist() == [0, 1, 3, 4, 5]
    assert p_indices.tolist() == [2, 3, 8, 99, 99]
    assert p_last.tolist() == [5, 4, 1, 1]
    assert pad_decode_metadata(indptr, indices, last, 2, 99)[0] is indptr
