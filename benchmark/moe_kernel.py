"""The mixture-of-experts kernel alone (`layers/moe_triton.fused_moe`) on the GPU: time per call
for Mixtral-8x7B's layer shapes at a few token counts, for the default tile config and the
candidates below, against the bytes of the experts the tokens chose over the copy bandwidth
measured at the start (`roofline.py`), or past a few hundred tokens their multiply-adds over the
bf16 matmul peak, whichever is longer. Each call is replayed from a CUDA graph, as the decode
step runs it (eager, the routing's small kernels would be timed as launches). For the default
config a profile follows: the router (its GEMM, softmax and top-k; `route_torch` for comparison)
and the kernel's parts (`align`, and `align_torch` for comparison, the gate|up GEMM, the
activation, the down GEMM with the sum over top-k) each captured and timed alone. For tuning `_config`; the W1 runs
measure the model.

    python3 benchmark/moe_kernel.py --tokens 1,8,64 [--hidden 4096 --inter 14336 --experts 8 --top-k 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))
from text_generation_server.layers.moe import route, route_torch  # noqa: E402
from text_generation_server.layers.ops import make_ops  # noqa: E402

import roofline  # noqa: E402
from gpu_timing import capture, event_ms  # noqa: E402

CANDIDATES = [  # (BM, BN, BK, warps, stages, SPLIT_K of the down projection)
    (16, 64, 128, 4, 3, 1), (16, 64, 128, 4, 3, 2), (16, 64, 128, 4, 3, 4), (16, 64, 128, 4, 3, 8),
    (16, 64, 128, 4, 4, 16), (16, 32, 128, 4, 4, 1), (16, 32, 128, 4, 4, 4), (16, 32, 128, 2, 4, 8),
    (16, 64, 256, 4, 3, 1), (16, 64, 256, 4, 3, 4), (16, 128, 128, 4, 3, 2), (16, 128, 128, 8, 4, 4),
    (16, 32, 256, 2, 4, 4), (16, 128, 64, 4, 5, 8), (32, 64, 128, 4, 3, 1), (32, 64, 128, 4, 3, 4),
    (64, 128, 64, 4, 3, 1), (64, 64, 64, 4, 4, 2), (64, 128, 64, 8, 3, 2),
]
PREFILL_CANDIDATES = [  # past 128 pairs (prefill): bigger tiles, more warps; no split
    (64, 128, 64, 4, 3, 1), (64, 128, 64, 8, 4, 1), (64, 256, 64, 8, 3, 1), (128, 128, 64, 8, 3, 1),
    (128, 128, 64, 8, 4, 1), (128, 256, 64, 8, 3, 1), (128, 128, 32, 4, 4, 1), (64, 128, 128, 8, 3, 1),
    (128, 64, 64, 4, 4, 1), (32, 128, 64, 4, 4, 1),
]


def graph_us(fn, iters: int) -> float:
    """Microseconds per replay of `fn` captured in a CUDA graph."""
    graph = capture(fn)
    return event_ms(graph.replay, iters, warmup=3) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", default="1,8,64")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--iters", type=int, default=50)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return
    from text_generation_server.layers import moe_triton
    from text_generation_server.layers.moe_triton import _config, fused_moe

    ceilings = roofline.measure()
    bw, peak = ceilings["copy_bandwidth_TBps"] * 1e12, ceilings["bf16_matmul_TFLOPs"] * 1e12
    e, k, h, i = a.experts, a.top_k, a.hidden, a.inter
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(e, 2 * i, h, generator=g, device="cuda") * 0.02).bfloat16()
    w2 = (torch.randn(e, h, i, generator=g, device="cuda") * 0.02).bfloat16()
    ops = make_ops(torch.device("cuda"))

    def act(x, y):
        return ops.act_mul("silu", x, y)

    out = []
    for t in (int(x) for x in a.tokens.split(",")):
        x = torch.randn(t, h, generator=g, device="cuda").bfloat16()
        weights, ids = route(torch.randn(t, e, generator=g, device="cuda"), k, True)
        hit = int(torch.unique(ids).numel())
        # the chosen experts' weights read once, or the pairs' multiply-adds at the matmul peak
        floor = max(hit * 3 * h * i * 2 / bw, 2 * t * k * 3 * h * i / peak)
        configs = [None] + [dict(BM=bm, BN=bn, BK=bk, num_warps=w, num_stages=st, SPLIT_K=sk)
                            for bm, bn, bk, w, st, sk in (CANDIDATES if t * k <= 128 else PREFILL_CANDIDATES)]
        for cfg in configs:
            try:
                s = graph_us(lambda: fused_moe(x, w13, w2, weights, ids, act, cfg), a.iters) / 1e6
            except Exception as err:  # noqa: BLE001 - a candidate that does not compile is reported
                out.append({"tokens": t, "config": cfg, "error": str(err)[:200]})
                continue
            row = {"tokens": t, "experts_hit": hit, "config": cfg or {"default": _config(t * k, e)}, "us": s * 1e6,
                   "floor_us": floor * 1e6, "ratio": floor / s}
            out.append(row)
            print(json.dumps(row), flush=True)
        print(json.dumps({"tokens": t, "profile_us": profile(moe_triton, x, w13, w2, weights, ids, act, k, a.iters)}),
              flush=True)


def profile(mt, x, w13, w2, weights, ids, act, top_k: int, iters: int) -> dict:
    """The default config's parts, each captured and timed alone (the same calls fused_moe makes)."""
    m = ids.numel()
    cfg = dict(mt._config(m, w13.shape[0]))
    split_k = cfg.pop("SPLIT_K", 1)
    pairs, experts = mt.align(ids, w13.shape[0], cfg["BM"])
    gate_up = torch.empty(m, w13.shape[1], dtype=x.dtype, device=x.device)
    inter = w13.shape[1] // 2
    h = act(gate_up[:, :inter], gate_up[:, inter:]).contiguous()
    flat_w = weights.contiguous().flatten().float()
    out_dtype = x.dtype if split_k == 1 else torch.float32

    def down():
        out = (torch.empty if split_k == 1 else torch.zeros)(m, x.shape[1], dtype=out_dtype, device=x.device)
        mt._gemm(h, w2, out, flat_w, pairs, experts, top_k, False, cfg, split_k)
        return out.view(-1, top_k, x.shape[1]).sum(dim=1).to(x.dtype)

    router = torch.randn(w13.shape[0], x.shape[1], device=x.device, dtype=x.dtype)
    return {
        "route": graph_us(lambda: route(torch.nn.functional.linear(x, router), top_k, True), iters),
        "route_torch": graph_us(lambda: route_torch(torch.nn.functional.linear(x, router), top_k, True), iters),
        "align": graph_us(lambda: mt.align(ids, w13.shape[0], cfg["BM"]), iters),
        "align_torch": graph_us(lambda: mt.align_torch(ids, w13.shape[0], cfg["BM"]), iters),
        "gate_up": graph_us(lambda: mt._gemm(x, w13, gate_up, None, pairs, experts, top_k, True, cfg), iters),
        "act": graph_us(lambda: act(gate_up[:, :inter], gate_up[:, inter:]).contiguous(), iters),
        "down_and_sum": graph_us(down, iters),
    }


if __name__ == "__main__":
    main()
