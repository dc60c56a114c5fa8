"""The mixture-of-experts MLP on CUDA: two grouped GEMMs over the (token, expert) pairs sorted by
expert (Triton; the CPU suite runs them under Triton's interpreter).

1. `align`: the T x top_k pairs are sorted by expert and each expert's run is padded to a whole
   number of BLOCK_M rows, so every row block of the GEMMs belongs to one expert. All on the
   device with fixed shapes (no host sync): a CUDA graph captures it.
2. gate|up: each block multiplies its pairs' token rows by its expert's [2I, H] weight, into a
   [pairs, 2I] buffer; the activation gates it ([pairs, I]).
3. down: each block multiplies its pairs' rows by its expert's [H, I] weight and by the pair's
   routing weight, into [pairs, H]; each token sums its top_k rows. With `SPLIT_K` > 1 (a config
   option for decode, where a few row blocks leave most SMs idle), each program sums a slice of
   the intermediate dimension and adds it into a float32 output atomically.

Every expert's weights are read once per row block that uses it, and experts no token chose are
not read at all: a decode step reads about min(T x top_k, E) experts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _grouped_gemm(a_ptr, b_ptr, c_ptr, w_ptr, pair_ptr, expert_ptr, num_pairs, num_experts,
                  stride_am, stride_be, stride_bn, stride_cm, N: tl.constexpr, K: tl.constexpr,
                  TOP_K: tl.constexpr, A_BY_TOKEN: tl.constexpr, MUL_W: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)  # this program's K tiles: pid_k, pid_k + SPLIT_K, ...
    e = tl.load(expert_ptr + pid_m).to(tl.int64)
    if e < num_experts:  # blocks past the last expert's run do nothing
        pair = tl.load(pair_ptr + pid_m * BM + tl.arange(0, BM))  # num_pairs marks padding
        valid = pair < num_pairs
        if A_BY_TOKEN:
            row = pair // TOP_K
        else:
            row = pair
        row = tl.where(valid, row, 0).to(tl.int64)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_k = pid_k * BK + tl.arange(0, BK)
        a_ptrs = a_ptr + row[:, None] * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + e * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK * SPLIT_K):
            kmask = offs_k + k0 < K
            a = tl.load(a_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None] & (offs_n[None, :] < N), other=0.0)
            acc += tl.dot(a, b)
            a_ptrs += BK * SPLIT_K
            b_ptrs += BK * SPLIT_K
        if MUL_W:
            acc = acc * tl.load(w_ptr + pair, mask=valid, other=0.0)[:, None]
        c_ptrs = c_ptr + tl.where(valid, pair, 0).to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        cmask = valid[:, None] & (offs_n[None, :] < N)
        if SPLIT_K == 1:
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=cmask)
        else:  # c is float32 and zeroed: the K slices add up there
            tl.atomic_add(c_ptrs, acc, mask=cmask)


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, top_k] -> (pair ids sorted by expert, each expert's run padded to block_m with
    T * top_k; [blocks * block_m] int32), (each block's expert, num_experts past the end; [blocks]
    int32). Fixed sizes: blocks = ceil((T * top_k + E * (block_m - 1)) / block_m)."""
    flat = topk_ids.flatten().long()
    m = flat.numel()
    dev = flat.device
    blocks = -(-(m + num_experts * (block_m - 1)) // block_m)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)  # pair ids, by expert
    sorted_experts = flat[order]
    run_start = torch.cumsum(counts, 0) - counts  # each expert's first place in `order`
    place = (padded_end - padded)[sorted_experts] + torch.arange(m, device=dev) - run_start[sorted_experts]
    pairs = torch.full((blocks * block_m,), m, dtype=torch.int32, device=dev)
    pairs.scatter_(0, place, order.to(torch.int32))
    starts = torch.arange(blocks, device=dev) * block_m
    experts = torch.searchsorted(padded_end, starts, right=True).to(torch.int32)  # == E past the end
    return pairs, experts


def _config(m: int) -> dict:
    if m <= 64:  # decode: few rows per expert, read the weights as wide as possible
        return dict(BM=16, BN=64, BK=128, num_warps=4, num_stages=3)
    return dict(BM=64, BN=128, BK=64, num_warps=4, num_stages=3)


def _gemm(a, b, c, weights, pairs, experts, top_k, a_by_token, cfg, split_k=1):
    num_pairs = c.shape[0]
    n, k = b.shape[1], b.shape[2]
    grid = (experts.numel(), triton.cdiv(n, cfg["BN"]), split_k)
    _grouped_gemm[grid](a, b, c, weights if weights is not None else c, pairs, experts, num_pairs, b.shape[0],
                        a.stride(0), b.stride(0), b.stride(1), c.stride(0), N=n, K=k,
                        TOP_K=top_k, A_BY_TOKEN=a_by_token, MUL_W=weights is not None, SPLIT_K=split_k, **cfg)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, act_mul, config: dict | None = None) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H] (gate rows, then up); w2 [E, H, I]; topk_weights [T, k] float32;
    topk_ids [T, k]; act_mul(gate, up) -> [pairs, I]. Returns sum_k weight * expert(x), [T, H].
    `config`: tile sizes and launch settings (`_config`'s keys, and SPLIT_K for the down
    projection) instead of the defaults (`benchmark/moe_kernel.py` compares them)."""
    t, hid = x.shape
    top_k = topk_ids.shape[1]
    m = t * top_k
    cfg = dict(config or _config(m))
    split_k = cfg.pop("SPLIT_K", 1)
    pairs, experts = align(topk_ids, w13.shape[0], cfg["BM"])
    x = x.contiguous()
    gate_up = torch.empty(m, w13.shape[1], dtype=x.dtype, device=x.device)
    _gemm(x, w13, gate_up, None, pairs, experts, top_k, True, cfg)
    inter = w13.shape[1] // 2
    h = act_mul(gate_up[:, :inter], gate_up[:, inter:]).contiguous()
    if split_k == 1:
        out = torch.empty(m, hid, dtype=x.dtype, device=x.device)
    else:
        out = torch.zeros(m, hid, dtype=torch.float32, device=x.device)
    _gemm(h, w2, out, topk_weights.contiguous().flatten().float(), pairs, experts, top_k, False, cfg, split_k)
    return out.view(t, top_k, hid).sum(dim=1).to(x.dtype)
