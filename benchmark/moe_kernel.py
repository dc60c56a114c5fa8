"""The mixture-of-experts kernel alone (`layers/moe_triton.fused_moe`) on the GPU: time per call
for Mixtral-8x7B's layer shapes at a few token counts, for the default tile config and the
candidates below, against the bytes of the experts the tokens chose over the copy bandwidth
measured at the start (`roofline.py`). For tuning `_config`; the W1 runs measure the model.

    python3 benchmark/moe_kernel.py --tokens 1,8,64 [--hidden 4096 --inter 14336 --experts 8 --top-k 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))
from text_generation_server.layers.moe import route  # noqa: E402
from text_generation_server.layers.ops import make_ops  # noqa: E402

import roofline  # noqa: E402
from gpu_timing import event_ms  # noqa: E402

CANDIDATES = [  # (BM, BN, BK, warps, stages, SPLIT_K of the down projection)
    (16, 64, 128, 4, 3, 1), (16, 64, 128, 4, 3, 2), (16, 64, 128, 4, 3, 4), (16, 32, 128, 4, 4, 1),
    (16, 64, 256, 4, 3, 1), (16, 128, 128, 4, 3, 2), (16, 32, 256, 2, 4, 4), (32, 64, 128, 4, 3, 1),
    (64, 128, 64, 4, 3, 1), (64, 64, 64, 4, 4, 2),
]


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
    from text_generation_server.layers.moe_triton import _config, fused_moe

    bw = roofline.measure()["copy_bandwidth_TBps"] * 1e12
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
        floor = hit * 3 * h * i * 2 / bw  # the chosen experts' weights, read once
        configs = [None] + [dict(BM=bm, BN=bn, BK=bk, num_warps=w, num_stages=st, SPLIT_K=sk)
                            for bm, bn, bk, w, st, sk in CANDIDATES]
        for cfg in configs:
            try:
                s = event_ms(lambda: fused_moe(x, w13, w2, weights, ids, act, cfg), a.iters, warmup=3) / 1e3
            except Exception as err:  # noqa: BLE001 - a candidate that does not compile is reported
                out.append({"tokens": t, "config": cfg, "error": str(err)[:200]})
                continue
            row = {"tokens": t, "experts_hit": hit, "config": cfg or {"default": _config(t * k)}, "us": s * 1e6,
                   "floor_us": floor * 1e6, "ratio": floor / s}
            out.append(row)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
