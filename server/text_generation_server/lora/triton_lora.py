"""LoRA on CUDA with two Triton kernels per projection group (q/k/v, o, gate/up, down), for prefill
and decode steps alike.

Rows are grouped by adapter into tiles of at most BLOCK_M rows of one slot (`plan_tiles`, on the
host; base rows get no tile). Per tile:
- shrink: v = x A^T for every projection of the group at once (x is their shared input), on
  tensor cores, split along the input dimension into fp32 partials;
- expand: y += v_g B_g^T over the group's fused output (the columns of projection g read its
  part of v), adding into the base projection's output in place.
So each adapter's weights are read once per tile, not once per row, and a step launches 8 kernels
per layer. Under a CUDA graph the plan sits in a static buffer sized for the bucket and the number
of tiles is known only on the device: there a bounded number of programs walk the tiles with a
stride (a decode step at batch 128 has ~8-60 tiles, not 128) and stop at the first empty one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

DECODE_BLOCK_M = 16  # rows per tile in decode steps (few rows share an adapter)
PREFILL_BLOCK_M = 64  # rows per tile in prefill steps (a prompt's tokens share one)


@dataclass(frozen=True)
class Tuning:
    k_split: int = 1024  # input features per shrink program: small batches still spread over the GPU
    block_n: int = 128  # most output columns per expand block
    chunk: int = 1024  # most output columns per expand program (a loop of blocks) in large steps
    warps: int = 4
    stages: int = 3
    programs: int = 1024  # about how many programs a kernel launches when only an upper bound of tiles is known


TUNING = Tuning()


@triton.jit
def _tile(plan_ptr, PLAN, tile, n, BLOCK_M: tl.constexpr):
    """A non-empty tile's slot, its `n` rows (padded to BLOCK_M) and which of them are live."""
    start = tl.load(plan_ptr + PLAN + tile)
    slot = tl.load(plan_ptr + 3 * PLAN + tile).to(tl.int64)
    live = tl.arange(0, BLOCK_M) < n
    rows = tl.load(plan_ptr + start + tl.arange(0, BLOCK_M), mask=live, other=0).to(tl.int64)
    return slot, rows, live


@triton.jit
def _next(plan_ptr, PLAN, tile):
    """The tile this program takes after `tile` (programs stride over the tiles) and its length: 0
    past the plan's last tile or its end."""
    tile += tl.num_programs(0)
    return tile, tl.load(plan_ptr + 2 * PLAN + tile, mask=tile < PLAN, other=0)


# The step's row count is not specialized on: one compiled kernel serves every batch and prompt length.
@triton.jit(do_not_specialize=["PLAN", "V_ROWS"])
def _shrink(x_ptr, x_stride, a_ptr, plan_ptr, v_ptr, PLAN, V_ROWS,
            D_IN: tl.constexpr, R: tl.constexpr, G: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, K_SPLIT: tl.constexpr):
    """v[s, row, g*R:(g+1)*R] = x[row, s-th K_SPLIT] @ A[slot, g*R:(g+1)*R, same]^T for the rows
    of one tile; program (tile, g, s). A: [S+1, G*R, D_IN]; v: [splits, V_ROWS, G*R] fp32."""
    tile, g, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r = tl.arange(0, R)
    n = tl.load(plan_ptr + 2 * PLAN + tile)
    while n > 0:
        slot, rows, live = _tile(plan_ptr, PLAN, tile, n, BLOCK_M)
        a_base = a_ptr + (slot * G + g) * (R * D_IN)
        acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
        for kk in range(0, K_SPLIT, BLOCK_K):
            k = s * K_SPLIT + kk + tl.arange(0, BLOCK_K)
            kin = k < D_IN
            x = tl.load(x_ptr + rows[:, None] * x_stride + k[None, :], mask=live[:, None] & kin[None, :], other=0.0)
            a = tl.load(a_base + r[None, :] * D_IN + k[:, None], mask=kin[:, None], other=0.0)  # [BLOCK_K, R]
            acc += tl.dot(x, a)
        tl.store(v_ptr + (s * V_ROWS + rows[:, None]) * (G * R) + g * R + r[None, :], acc, mask=live[:, None])
        tile, n = _next(plan_ptr, PLAN, tile)


@triton.jit(do_not_specialize=["PLAN", "V_ROWS"])
def _expand(v_ptr, b_ptr, plan_ptr, y_ptr, y_stride, PLAN, V_ROWS,
            N_OUT: tl.constexpr, R: tl.constexpr, G: tl.constexpr, SPLITS: tl.constexpr,
            C1: tl.constexpr, C2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """y[row, chunk] += v_g[row] @ B[slot, chunk]^T for the rows of one tile, g the projection
    whose columns (from C1, from C2) hold the chunk, BLOCK_N columns at a time; program (tile,
    chunk). B: [S+1, N_OUT, R] (pre-scaled); y: the group's fused output [T, N_OUT] (row stride
    y_stride). A chunk of many blocks spreads the tile's fixed cost (plan, rows, v) over more bytes."""
    tile, nc = tl.program_id(0), tl.program_id(1)
    r = tl.arange(0, R)
    g = (nc * CHUNK >= C1).to(tl.int32) + (nc * CHUNK >= C2).to(tl.int32)  # chunks never straddle
    n = tl.load(plan_ptr + 2 * PLAN + tile)
    while n > 0:
        slot, rows, live = _tile(plan_ptr, PLAN, tile, n, BLOCK_M)
        v = tl.zeros((BLOCK_M, R), dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            v += tl.load(v_ptr + (s * V_ROWS + rows[:, None]) * (G * R) + g * R + r[None, :], mask=live[:, None], other=0.0)
        v = v.to(b_ptr.dtype.element_ty)
        b_at = b_ptr + slot * (N_OUT * R) + r[:, None]
        y_rows = y_ptr + rows[:, None] * y_stride
        for cb in range(0, CHUNK, BLOCK_N):
            c = nc * CHUNK + cb + tl.arange(0, BLOCK_N)
            cin = c < N_OUT
            b = tl.load(b_at + c[None, :] * R, mask=cin[None, :], other=0.0)  # [R, BLOCK_N]
            both = live[:, None] & cin[None, :]
            y = tl.load(y_rows + c[None, :], mask=both, other=0.0)
            tl.store(y_rows + c[None, :], (y.to(tl.float32) + tl.dot(v, b)).to(y.dtype), mask=both)
        tile, n = _next(plan_ptr, PLAN, tile)


def plan_tiles(row_slots: np.ndarray, block_m: int, size: int | None = None) -> tuple[np.ndarray, int]:
    """Rows grouped by slot into tiles of at most `block_m` rows; base rows (slot 0) get none.

    Returns (plan, number of tiles). plan: int32 [4, size] (size >= rows): the rows in slot order,
    then per tile its start in that order, its length (0 past the last tile) and its slot."""
    t = len(row_slots)
    size = t if size is None else size
    plan = np.zeros((4, size), dtype=np.int32)
    order = np.argsort(row_slots, kind="stable")
    plan[0, :t] = order
    s = np.asarray(row_slots)[order]
    edges = np.flatnonzero(np.diff(s)) + 1
    starts, ends = np.concatenate([[0], edges]), np.concatenate([edges, [t]])
    keep = s[starts] != 0 if t else np.zeros(0, dtype=bool)
    starts, ends = starts[keep], ends[keep]
    chunks = -(-(ends - starts) // block_m)
    n = int(chunks.sum())
    first = np.repeat(np.cumsum(chunks) - chunks, chunks)  # index of each tile's run's first tile
    tile_start = np.repeat(starts, chunks) + block_m * (np.arange(n) - first)
    plan[1, :n] = tile_start
    plan[2, :n] = np.minimum(block_m, np.repeat(ends, chunks) - tile_start)
    plan[3, :n] = np.repeat(s[starts], chunks)
    return plan, n


def block_n(cols: list[int], most: int = 128) -> int:
    """Output columns per expand program: a power of two up to `most` that divides every boundary
    between the group's projections (so a block belongs to one projection); 16 at least."""
    bn = most
    for c in cols[1:-1]:
        while c % bn:
            bn //= 2
    if bn < 16:
        raise ValueError(f"projection sizes {cols} are not multiples of 16: no Triton LoRA kernels for this model")
    return bn


@functools.lru_cache(maxsize=None)
def _group_launch(table, block_m: int, tuning: Tuning) -> tuple[int, dict]:
    """What a step's launches take from the table alone (computed once, not per step): BLOCK_K, and
    per group (K_SPLIT, splits, BLOCK_N, most columns per expand program, output columns)."""
    block_k = min(128 if block_m <= 16 else 64, tuning.k_split)
    groups = {}
    for group, cols in table.cols.items():
        d_in = table.a[(0, group)].shape[2]
        k_split = min(tuning.k_split, triton.cdiv(d_in, block_k) * block_k)
        groups[group] = (k_split, triton.cdiv(d_in, k_split), block_n(cols, tuning.block_n), block_n(cols, tuning.chunk),
                         cols[-1])
    return block_k, groups


class TritonLoraStep:
    """The LoRA part of one step on a SlotTable. `row_slots[i]`: row i's slot (0 = base)."""

    def __init__(self, table, row_slots: np.ndarray, block_m: int = DECODE_BLOCK_M, plan_buf: torch.Tensor | None = None,
                 tuning: Tuning = TUNING):
        self.table, self.block_m, self.tuning = table, block_m, tuning
        r = table.max_rank
        assert r & (r - 1) == 0, "the slot table's rank must be a power of two"
        size = len(row_slots) if plan_buf is None else plan_buf.shape[1]
        plan, tiles = plan_tiles(np.asarray(row_slots, dtype=np.int64), block_m, size)
        host = torch.from_numpy(plan)
        if plan_buf is None:  # one program per tile along the tile axis
            self.plan, self.tiles, bound = host.to(table.device, non_blocking=True), tiles, None  # staged: no stream wait
        else:  # the static buffer of a captured graph: programs stride over however many tiles there are
            plan_buf.copy_(host, non_blocking=True)
            self.plan, self.tiles = plan_buf, size
            bound = min(size, table.num_slots + size // block_m)  # a tile per slot present, and one per full tile
        self.v_rows = size
        self.block_k, groups = _group_launch(table, block_m, tuning)

        def along(other: int) -> int:  # programs along the tile axis beside `other` programs per tile
            return self.tiles if bound is None else max(1, min(bound, tuning.programs // other))

        self.launch = {}  # group -> (shrink grid, K_SPLIT, expand grid, BLOCK_N, CHUNK)
        for group, (k_split, splits, bn, top, n_out) in groups.items():
            # Columns per expand program (a power of two times BLOCK_N, so few compiled variants):
            # under a graph, one block while there can be only few tiles (a decode step of a few rows
            # needs every program it can get), up to `top` as they could fill the GPU; eager steps
            # (prefills, or decodes above the largest graph) always take `top`, the variant that
            # compile_kernels compiles at warmup (a graph's are compiled when it is captured).
            if bound is None:
                chunk = top
            else:
                many = triton.cdiv(n_out, bn) * bound // tuning.programs
                chunk = bn * min(top // bn, 1 << (max(1, many).bit_length() - 1))
            chunks = triton.cdiv(n_out, chunk)
            self.launch[group] = ((along(len(group) * splits), len(group), splits), k_split, (along(chunks), chunks), bn, chunk)

    def apply(self, layer: int, projs: tuple[str, ...], x: torch.Tensor, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.tiles == 0:
            return ys
        return self.expand(layer, projs, self.shrink(layer, projs, x), ys)

    def shrink(self, layer: int, projs: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
        """v = x A^T for the group's projections: fp32 partials [splits, rows, G*R]."""
        a = self.table.a[(layer, projs)]
        grid, k_split = self.launch[projs][:2]
        g, r = len(projs), self.table.max_rank
        assert x.stride(1) == 1
        v = torch.empty(grid[2], self.v_rows, g * r, dtype=torch.float32, device=x.device)
        _shrink[grid](x, x.stride(0), a, self.plan, v, self.plan.shape[1], self.v_rows, D_IN=a.shape[2],
                      R=r, G=g, BLOCK_M=self.block_m, BLOCK_K=self.block_k, K_SPLIT=k_split,
                      num_warps=self.tuning.warps, num_stages=self.tuning.stages)
        return v

    def expand(self, layer: int, projs: tuple[str, ...], v: torch.Tensor, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        """ys += v_g B_g^T, in place into the group's fused output."""
        b = self.table.b[(layer, projs)]
        cols = self.table.cols[projs]
        grid, bn, chunk = self.launch[projs][2:]
        y = ys[0]
        for i, yi in enumerate(ys):  # the group's outputs must be column views of one tensor
            assert yi.stride() == y.stride() and yi.data_ptr() == y.data_ptr() + cols[i] * y.element_size(), \
                "LoRA kernels add into the fused output of the group"
        assert y.stride(1) == 1
        n_out = cols[-1]
        c1, c2 = (cols[1:3] + [n_out, n_out])[:2]
        _expand[grid](v, b, self.plan, y, y.stride(0), self.plan.shape[1], self.v_rows,
                      N_OUT=n_out, R=self.table.max_rank, G=len(projs), SPLITS=v.shape[0], C1=c1, C2=c2,
                      BLOCK_M=self.block_m, BLOCK_N=bn, CHUNK=chunk, num_warps=self.tuning.warps,
                      num_stages=self.tuning.stages)
        return ys


def compile_kernels(table, dtype: torch.dtype) -> None:
    """Compiles the kernels of every group for the eager prefill and decode steps (at warmup, so no
    request waits for Triton): one tile of zero inputs each, on slot 1, into scratch outputs."""
    for block_m in (DECODE_BLOCK_M, PREFILL_BLOCK_M):
        table.launch_every_group(TritonLoraStep(table, np.ones(block_m, dtype=np.int64), block_m), block_m, dtype)
