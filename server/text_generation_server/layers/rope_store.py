"""Rotary embedding fused with the paged KV-cache write: one Triton kernel per layer (CUDA; the
CPU suite runs it under Triton's interpreter).

One program per token: it reads the token's q and k heads (strided views of the fused q/k/v GEMM
output are fine), rotates them with the float32 cos/sin table (Llama's rotate-half layout), writes
the rotated q and k as contiguous tensors (attention reads q; a prefill's ragged attention reads
the new k and v), and writes the rotated k and the v heads into the cache at the token's cache location.
It replaces a rotary kernel and two scatters (`index_copy_` of k and of v).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, q_out_ptr, k_out_ptr, cos_sin_ptr, pos_ptr, loc_ptr, k_cache_ptr,
                       v_cache_ptr, q_st, q_sh, k_st, k_sh, v_st, v_sh,
                       HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr, BHQ: tl.constexpr,
                       BHK: tl.constexpr, D: tl.constexpr, TAIL: tl.constexpr, BT: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    loc = tl.load(loc_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF)
    cos = tl.load(cos_sin_ptr + pos * 2 * HALF + i)[None, :]
    sin = tl.load(cos_sin_ptr + pos * 2 * HALF + HALF + i)[None, :]
    d = D  # head_dim: 2 * HALF rotated dimensions, then TAIL that pass unrotated (partial rotary)

    hq = tl.arange(0, BHQ)[:, None]
    mq = hq < HQ
    src = q_ptr + t * q_st + hq * q_sh + i[None, :]
    x1 = tl.load(src, mask=mq).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mq).to(tl.float32)
    dst = q_out_ptr + t * HQ * d + hq * d + i[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(q_out_ptr.dtype.element_ty), mask=mq)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(q_out_ptr.dtype.element_ty), mask=mq)

    hk = tl.arange(0, BHK)[:, None]
    mk = hk < HK
    src = k_ptr + t * k_st + hk * k_sh + i[None, :]
    x1 = tl.load(src, mask=mk).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mk).to(tl.float32)
    y1 = (x1 * cos - x2 * sin).to(k_out_ptr.dtype.element_ty)
    y2 = (x2 * cos + x1 * sin).to(k_out_ptr.dtype.element_ty)
    dst = k_out_ptr + t * HK * d + hk * d + i[None, :]
    tl.store(dst, y1, mask=mk)
    tl.store(dst + HALF, y2, mask=mk)
    dst = k_cache_ptr + loc * HK * d + hk * d + i[None, :]
    tl.store(dst, y1.to(k_cache_ptr.dtype.element_ty), mask=mk)
    tl.store(dst + HALF, y2.to(k_cache_ptr.dtype.element_ty), mask=mk)

    src = v_ptr + t * v_st + hk * v_sh + i[None, :]
    dst = v_cache_ptr + loc * HK * d + hk * d + i[None, :]
    tl.store(dst, tl.load(src, mask=mk).to(v_cache_ptr.dtype.element_ty), mask=mk)
    tl.store(dst + HALF, tl.load(src + HALF, mask=mk).to(v_cache_ptr.dtype.element_ty), mask=mk)

    if TAIL > 0:  # the unrotated dimensions of q and k, and the rest of v
        j = 2 * HALF + tl.arange(0, BT)[None, :]
        mj = j < D
        x = tl.load(q_ptr + t * q_st + hq * q_sh + j, mask=mq & mj)
        tl.store(q_out_ptr + t * HQ * d + hq * d + j, x.to(q_out_ptr.dtype.element_ty), mask=mq & mj)
        x = tl.load(k_ptr + t * k_st + hk * k_sh + j, mask=mk & mj)
        tl.store(k_out_ptr + t * HK * d + hk * d + j, x.to(k_out_ptr.dtype.element_ty), mask=mk & mj)
        tl.store(k_cache_ptr + loc * HK * d + hk * d + j, x.to(k_cache_ptr.dtype.element_ty), mask=mk & mj)
        x = tl.load(v_ptr + t * v_st + hk * v_sh + j, mask=mk & mj)
        tl.store(v_cache_ptr + loc * HK * d + hk * d + j, x.to(v_cache_ptr.dtype.element_ty), mask=mk & mj)


def rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor,
               cache_locs: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, heads, dim], k / v: [T, kv_heads, dim] (each head's dim contiguous; token and head
    strides free); cos_sin: [max_positions, rotary_dim] float32 (cos of each pair's angle, then
    sin; rotary_dim <= dim: the dimensions past it pass unrotated);
    positions / cache_locs: [T]; caches: [num_blocks, block_size, kv_heads, dim], contiguous.
    Returns the rotated q and k, contiguous; the cache holds the rotated k and v at the cache_locs."""
    t, hq, d = q.shape
    hk = k.shape[1]
    half = cos_sin.shape[1] // 2
    assert half & (half - 1) == 0 and 2 * half <= d, "the rotary dimension must be twice a power of two"
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    q_out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, hk, d), dtype=k.dtype, device=k.device)
    if t:
        _rope_store_kernel[(t,)](q, k, v, q_out, k_out, cos_sin, positions, cache_locs, k_cache, v_cache,
                                 q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                 HQ=hq, HK=hk, HALF=half, BHQ=triton.next_power_of_2(hq),
                                 BHK=triton.next_power_of_2(hk), D=d, TAIL=d - 2 * half,
                                 BT=triton.next_power_of_2(max(d - 2 * half, 1)))
    return q_out, k_out
