"""Decode-sized projections on the GPU: cuBLAS (`F.linear`) against a Triton kernel written for
a few rows (below: each program streams BN output columns' rows of W through BK-deep tiles, no
split of K) for candidate tiles, on an 8B model's projection shapes, each replayed from a CUDA
graph; the floor is the weight's bytes over the copy bandwidth measured at the start. An
experiment, not a server path: it measured what a hand-written decode GEMM could gain over
cuBLAS (docs/benchmarks.md, ninth session).

    python3 benchmark/decode_gemm.py [--rows 1,4,16]
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

import roofline
from gpu_timing import capture, event_ms

MAX_ROWS = 16


@triton.jit
def _skinny(x_ptr, w_ptr, y_ptr, m, stride_xm, stride_wn, stride_ym, N: tl.constexpr, K: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    offs_m = tl.arange(0, BM)
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    rows = offs_m < m
    cols = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kmask = offs_k + k0 < K
        a = tl.load(x_ptrs, mask=rows[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=kmask[:, None] & cols[None, :], other=0.0)
        acc += tl.dot(a, b)
        x_ptrs += BK
        w_ptrs += BK
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=rows[:, None] & cols[None, :])


def linear(x: torch.Tensor, weight: torch.Tensor, cfg: dict) -> torch.Tensor:
    """F.linear(x, weight) for x [m <= MAX_ROWS, K], weight [N, K] with unit stride along K;
    `cfg`: BN, BK, num_warps, num_stages."""
    m, k = x.shape
    n = weight.shape[0]
    assert m <= MAX_ROWS and weight.stride(1) == 1
    x = x if x.stride(1) == 1 else x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _skinny[(triton.cdiv(n, cfg["BN"]),)](x, weight, y, m, x.stride(0), weight.stride(0), y.stride(0), N=n, K=k,
                                          BM=MAX_ROWS, **cfg)
    return y


SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
CANDIDATES = [(64, 256, 4, 3), (64, 128, 4, 3), (32, 256, 4, 3), (32, 128, 4, 4), (16, 256, 4, 3), (16, 512, 4, 3),
              (128, 128, 4, 3), (128, 256, 8, 3), (32, 512, 4, 3), (64, 512, 8, 3)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--iters", type=int, default=100)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return
    bw = roofline.measure()["copy_bandwidth_TBps"] * 1e12
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (n, k) in SHAPES.items():
        w = (torch.randn(n, k, generator=g, device="cuda") * 0.02).bfloat16()
        floor_us = n * k * 2 / bw * 1e6
        for m in (int(r) for r in a.rows.split(",")):
            x = torch.randn(m, k, generator=g, device="cuda").bfloat16()
            want = torch.nn.functional.linear(x.float(), w.float())
            rows = {"cublas": event_ms(capture(lambda: torch.nn.functional.linear(x, w)).replay, a.iters, 3) * 1e3}
            for bn, bk, warps, stages in CANDIDATES:
                cfg = dict(BN=bn, BK=bk, num_warps=warps, num_stages=stages)
                try:
                    got = linear(x, w, cfg)
                    err = float((got.float() - want).abs().max())
                    us = event_ms(capture(lambda: linear(x, w, cfg)).replay, a.iters, 3) * 1e3
                except Exception as e:  # noqa: BLE001 - a candidate that does not compile is reported
                    rows[str((bn, bk, warps, stages))] = str(e)[:80]
                    continue
                rows[str((bn, bk, warps, stages))] = (round(us, 1), round(err, 4))
            print(json.dumps({"shape": name, "n": n, "k": k, "rows": m, "floor_us": round(floor_us, 1),
                              "cublas_ratio": round(floor_us / rows["cublas"], 3), "us": rows}), flush=True)


if __name__ == "__main__":
    main()
