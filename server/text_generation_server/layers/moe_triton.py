"""The mixture-of-experts MLP on CUDA: two grouped GEMMs over the (token, expert) pairs sorted by
expert (Triton; the CPU suite runs them under Triton's interpreter).

0. `route_topk`: the router's softmax, top-k and renormalisation in one kernel.
1. `align`: the T x top_k pairs are sorted by expert and each expert's run is padded to a whole
   number of BLOCK_M rows, so every row block of the GEMMs belongs to one expert. All on the
   device with fixed shapes (no host sync): a CUDA graph captures it. One Triton program for
   decode-sized inputs, a torch sort past them.
2. gate|up: each block multiplies its pairs' token rows by its expert's [2I, H] weight, into a
   [pairs, 2I] buffer; the activation gates it ([pairs, I]).
3. down: each block multiplies its pairs' rows by its expert's [H, I] weight and by the pair's
   routing weight, into [pairs, H]; each token sums its top_k rows. With `SPLIT_K` > 1 (a config
   option, off by default: see `_config`), each program sums a slice of the intermediate
   dimension and adds it into a float32 output atomically.

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


ALIGN_KERNEL_MAX_PAIRS = 1024  # past this (prefill), the chunks run one after another for longer than torch's sort


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, top_k] -> (pair ids sorted by expert, each expert's run padded to block_m with
    T * top_k; [blocks * block_m] int32), (each block's expert, num_experts past the end; [blocks]
    int32). Fixed sizes: blocks = ceil((T * top_k + E * (block_m - 1)) / block_m). Pairs keep
    their order within an expert's run (a stable sort).

    Decode-sized inputs take one Triton program (`_align_kernel`); the ~30 small torch kernels of
    `align_torch` cost 46 us per MoE layer at batch 1 on an H200, more than a quarter of the
    experts' own reading time. Larger ones (prefill) take `align_torch`."""
    m = topk_ids.numel()
    if m > ALIGN_KERNEL_MAX_PAIRS:
        return align_torch(topk_ids, num_experts, block_m)
    blocks = -(-(m + num_experts * (block_m - 1)) // block_m)
    pairs = torch.empty(blocks * block_m, dtype=torch.int32, device=topk_ids.device)
    experts = torch.empty(blocks, dtype=torch.int32, device=topk_ids.device)
    ep = triton.next_power_of_2(num_experts)
    chunk, fill, nbc = min(64, max(16, 4096 // ep)), 1024, max(16, 4096 // ep)
    _align_kernel[(1,)](topk_ids.flatten(), pairs, experts, m, num_experts, blocks, blocks * block_m, BM=block_m,
                        EP=ep, C=chunk, N_C=_trips(m, chunk), FILL=fill, N_FILL=_trips(blocks * block_m, fill),
                        NBC=nbc, N_B=_trips(blocks, nbc), num_warps=4)
    return pairs, experts


def _trips(n: int, size: int) -> int:
    """A loop's constexpr trip count over n in steps of size, rounded up to a power of two (few
    kernel variants to compile; the steps past n are masked)."""
    return triton.next_power_of_2(-(-n // size))


@triton.jit
def _align_kernel(ids_ptr, pairs_ptr, experts_ptr, m, num_experts, num_blocks, total, BM: tl.constexpr, EP: tl.constexpr,
                  C: tl.constexpr, N_C: tl.constexpr, FILL: tl.constexpr, N_FILL: tl.constexpr, NBC: tl.constexpr,
                  N_B: tl.constexpr):
    """`align` in one program: padding everywhere; each expert's count (chunks of C pairs, counts in
    registers); the padded runs' ends (a cumulative sum); each pair to its run's start plus the
    number of earlier pairs with its expert; each block's expert (how many runs end at or before
    its first row). The loops' trip counts are constexpr (N_*; Triton's interpreter cannot loop to
    a runtime bound), the chunks past the end masked."""
    for f in range(N_FILL):
        offs = f * FILL + tl.arange(0, FILL)
        tl.store(pairs_ptr + offs, tl.zeros([FILL], tl.int32) + m, mask=offs < total)
    e_offs = tl.arange(0, EP)
    c_offs = tl.arange(0, C)
    earlier = c_offs[None, :] < c_offs[:, None]  # [i, j]: pair j comes before pair i in the chunk
    counts = tl.zeros([EP], tl.int32)
    for c in range(N_C):
        p = c * C + c_offs
        valid = p < m
        e = tl.load(ids_ptr + p, mask=valid, other=0).to(tl.int32)
        hit = (e[:, None] == e_offs[None, :]) & valid[:, None]  # [C, EP]
        counts += tl.sum(hit.to(tl.int32), axis=0)
    padded = (counts + BM - 1) // BM * BM
    padded_end = tl.cumsum(padded, 0)
    start = padded_end - padded
    tl.debug_barrier()  # the padding is written before any pair lands on it
    seen = tl.zeros([EP], tl.int32)  # pairs of each expert placed by the chunks before this one
    for c in range(N_C):
        p = c * C + c_offs
        valid = p < m
        e = tl.load(ids_ptr + p, mask=valid, other=0).to(tl.int32)
        hit = (e[:, None] == e_offs[None, :]) & valid[:, None]
        base = tl.sum(tl.where(hit, (start + seen)[None, :], 0), axis=1)
        same = (e[:, None] == e[None, :]) & earlier & valid[None, :]
        dest = base + tl.sum(same.to(tl.int32), axis=1)
        tl.store(pairs_ptr + dest, p, mask=valid)
        seen += tl.sum(hit.to(tl.int32), axis=0)
    ends = tl.where(e_offs < num_experts, padded_end, 2147483647)  # only real experts' runs count
    for bb in range(N_B):
        b = bb * NBC + tl.arange(0, NBC)
        first_row = b * BM
        before = tl.sum((ends[None, :] <= first_row[:, None]).to(tl.int32), axis=1)
        tl.store(experts_ptr + b, before, mask=b < num_blocks)


def align_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`align` in torch (a stable sort by expert): for inputs past the kernel's size, and its oracle."""
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


def route_topk(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`moe.route` in one kernel: float32 softmax over each row's experts, the top k (the lowest
    index first among equal probabilities), renormalised over the k if asked. Returns (weights
    [T, k] float32, ids [T, k] int64)."""
    t, e = logits.shape
    weights = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=logits.device)
    ep = triton.next_power_of_2(e)
    rows = max(1, min(16, 4096 // ep))
    _route_kernel[(triton.cdiv(t, rows),)](logits, weights, ids, t, e, logits.stride(0), K=top_k,
                                           KP=triton.next_power_of_2(top_k), RENORM=renormalize, R=rows, EP=ep)
    return weights, ids


@triton.jit
def _route_kernel(logits_ptr, w_ptr, ids_ptr, t, e, stride, K: tl.constexpr, KP: tl.constexpr, RENORM: tl.constexpr,
                  R: tl.constexpr, EP: tl.constexpr):
    rows = tl.program_id(0) * R + tl.arange(0, R)
    cols = tl.arange(0, EP)
    live = (rows < t)[:, None] & (cols < e)[None, :]
    x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=live, other=-1e30).to(tl.float32)
    p = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = tl.where(live, p, 0.0)
    p = p / tl.maximum(tl.sum(p, axis=1), 1e-30)[:, None]  # rows past t are all zero
    p = tl.where(live, p, -1.0)  # never chosen
    kcols = tl.arange(0, KP)
    w = tl.zeros([R, KP], tl.float32)
    which = tl.zeros([R, KP], tl.int64)
    for j in tl.static_range(K):
        best = tl.max(p, axis=1)
        idx = tl.min(tl.where(p == best[:, None], cols[None, :], EP), axis=1)
        idx = tl.minimum(idx, e - 1)  # a NaN row matches nothing: an expert that exists, not past the end
        w = tl.where(kcols[None, :] == j, best[:, None], w)
        which = tl.where(kcols[None, :] == j, idx[:, None].to(tl.int64), which)
        p = tl.where(cols[None, :] == idx[:, None], -1.0, p)
    if RENORM:
        w = w / tl.sum(w, axis=1)[:, None]
    out = (rows < t)[:, None] & (kcols < K)[None, :]
    tl.store(w_ptr + rows[:, None] * K + kcols[None, :], w, mask=out)
    tl.store(ids_ptr + rows[:, None] * K + kcols[None, :], which, mask=out)


def _config(m: int, num_experts: int) -> dict:
    """Tiles for m (token, expert) pairs over num_experts, by the pairs an expert gets on average
    (the row blocks' fill). Measured with `benchmark/moe_kernel.py` at Mixtral's shapes (8
    experts) on an H200, graph-replayed, against the experts' bytes over the copy bandwidth or,
    past that, the pairs' multiply-adds over the matmul peak: 1 token 0.88, 8 tokens 1.0, 64
    tokens 0.98, 128 tokens 0.92, 512 tokens 0.61, 2,048 0.58, 8,192 0.62 (the last three prefill,
    where the previous single config gave 0.58, 0.47, 0.43). Other expert counts take the tiles
    of the same fill, unmeasured: 128 experts' 1,024 pairs fill 16-row blocks as Mixtral's 64 do,
    where 128-row ones would be mostly padding. Splitting K of the down projection gained at
    most 1% more and makes its sums' order vary (atomics), so the defaults do not split."""
    per_expert = m / num_experts
    if per_expert <= 8:  # decode: few rows per expert; deep K tiles keep more of each expert's bytes in flight
        return dict(BM=16, BN=64, BK=256, num_warps=4, num_stages=3)
    if per_expert <= 16:
        return dict(BM=32, BN=64, BK=128, num_warps=4, num_stages=3)
    if per_expert <= 64:
        return dict(BM=64, BN=128, BK=64, num_warps=4, num_stages=3)
    if per_expert <= 256:
        return dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)
    return dict(BM=128, BN=256, BK=64, num_warps=8, num_stages=3)


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
    cfg = dict(config or _config(m, w13.shape[0]))
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
