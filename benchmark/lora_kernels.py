"""What multi-LoRA adds to the projections of a step, without a model: the base GEMMs of every layer
(random weights) with and without the LoRA kernels over a full slot table of random rank-R adapters,
rows assigned to adapters by W3's power law. Decode steps run as CUDA graphs (as the engine runs
them), prefills eagerly. Attention, norms and sampling are left out, so the ratio printed is a
lower bound of the step's (the LoRA share of a whole step is smaller).

  python3 benchmark/lora_kernels.py [--shape llama-8b-shape] [--rank 16] [--slots 100]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import capture, event_ms  # noqa: E402
from make_model import SHAPES  # noqa: E402
from text_generation_server.lora.adapter import GROUPS, projection_shapes  # noqa: E402
from text_generation_server.lora.slots import SlotTable  # noqa: E402
from text_generation_server.lora.triton_lora import (  # noqa: E402
    DECODE_BLOCK_M, PREFILL_BLOCK_M, TUNING, TritonLoraStep, Tuning)
from text_generation_server.models.config import ModelConfig  # noqa: E402


def power_law(n_rows: int, n_adapters: int, rng) -> np.ndarray:
    """Slots 1..n_adapters, popularity proportional to 1/rank (alpha 1), as load.py's W3."""
    p = 1.0 / np.arange(1, n_adapters + 1)
    return rng.choice(np.arange(1, n_adapters + 1), size=n_rows, p=p / p.sum())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-8b-shape")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--slots", type=int, default=100)
    ap.add_argument("--batches", default="1,8,32,64,128")
    ap.add_argument("--adapters", default="1,8,32,100")
    ap.add_argument("--prefill-tokens", type=int, default=4096)
    ap.add_argument("--eager-batch", type=int, default=256, help="a decode step above the largest graph bucket")
    ap.add_argument("--host-profile", action="store_true", help="cProfile the host side of eager LoRA steps")
    ap.add_argument("--sweep", default="", help="tunings to compare first at batch 1 and 128 with N=100: "
                    "k<k_split>-n<block_n>-c<chunk>-w<warps>-s<stages>-p<programs>, comma-separated")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 1000,
                                 "max_position_embeddings": 4096, **SHAPES[a.shape]})
    shapes = projection_shapes(cfg)
    torch.manual_seed(0)
    # One layer's fused base weights, reused by every layer (a layer's weights outsize L2 anyway).
    base = {g: torch.randn(sum(shapes[p][0] for p in g), shapes[g[0]][1], device=dev, dtype=dt) * 0.02 for g in GROUPS}
    table = SlotTable(cfg, dt, dev, a.slots, a.rank)
    for t in list(table.a.values()) + list(table.b.values()):
        t[1:].normal_(0, 0.02)

    tuning = TUNING

    def step(slots, prefill, plan_buf=None):
        return TritonLoraStep(table, slots, PREFILL_BLOCK_M if prefill else DECODE_BLOCK_M, plan_buf, tuning)

    def layers(x_in, lora):
        """The projections of every layer; each group's input is fresh (as in the model)."""
        for layer in range(cfg.num_layers):
            for g in GROUPS:
                x = x_in[g[0]]
                ys = list(torch.nn.functional.linear(x, base[g]).split([shapes[p][0] for p in g], dim=1))
                if lora is not None:
                    lora.apply(layer, g, x, ys)

    def inputs(rows):
        return {g[0]: torch.randn(rows, shapes[g[0]][1], device=dev, dtype=dt) for g in GROUPS}

    def decode_ms(b, n, parts=False):
        """Projections of all layers at batch b with N=n (0: base), as a CUDA graph; with `parts`,
        the shrinks alone and the expands alone too."""
        x, plan = inputs(b), torch.zeros(4, b, dtype=torch.int32, device=dev)
        lora = None if n == 0 else step(np.zeros(b, dtype=np.int64), False, plan)
        g = capture(lambda: layers(x, lora))
        if n:
            step(power_law(b, n, np.random.default_rng(1)), False, plan)
        out = {"all": event_ms(g.replay)}
        if parts and n:
            shrinks = capture(lambda: [lora.shrink(layer, grp, x[grp[0]]) for layer in range(cfg.num_layers) for grp in GROUPS])
            out["shrink"] = event_ms(shrinks.replay)
            vs = {(layer, grp): lora.shrink(layer, grp, x[grp[0]]) for layer in range(cfg.num_layers) for grp in GROUPS}
            ys = {grp: list(torch.zeros(b, sum(shapes[p][0] for p in grp), device=dev, dtype=dt).split(
                [shapes[p][0] for p in grp], dim=1)) for grp in GROUPS}
            expands = capture(lambda: [lora.expand(layer, grp, vs[(layer, grp)], ys[grp])
                                     for layer in range(cfg.num_layers) for grp in GROUPS])
            out["expand"] = event_ms(expands.replay)
        return out

    for spec in [v for v in a.sweep.split(",") if v]:
        fields = {"k": "k_split", "n": "block_n", "c": "chunk", "w": "warps", "s": "stages", "p": "programs"}
        tuning = Tuning(**{fields[p[0]]: int(p[1:]) for p in spec.split("-")})  # an unknown letter is a KeyError
        t1, t128 = decode_ms(1, 100)["all"], decode_ms(128, 100)["all"]
        print(f"sweep {spec}: batch 1 {t1:.3f} ms, batch 128 {t128:.3f} ms", flush=True)
    tuning = TUNING
    for b in (1, 128):
        base_ms = decode_ms(b, 0)["all"]
        parts = decode_ms(b, 100, parts=True)
        print(f"parts at batch {b}, N=100 (ms): base GEMMs {base_ms:.3f}, with LoRA {parts['all']:.3f}, "
              f"shrinks alone {parts['shrink']:.3f}, expands alone {parts['expand']:.3f}", flush=True)

    rng = np.random.default_rng(0)
    results = {"shape": a.shape, "rank": a.rank, "decode": [], "prefill": []}
    print(f"{a.shape}, {a.slots} slots of rank {a.rank}, Triton kernels; times of the projections of all "
          f"{cfg.num_layers} layers (ms)")
    for b in (int(v) for v in a.batches.split(",")):
        x = inputs(b)
        graphs = {}
        plan = torch.zeros(4, b, dtype=torch.int32, device=dev)
        for label in ["base"] + [f"N={n}" for n in a.adapters.split(",")]:
            lora = None if label == "base" else step(np.zeros(b, dtype=np.int64), False, plan)
            graphs[label] = capture(lambda: layers(x, lora))
        row = {"batch": b}
        for label, g in graphs.items():
            if label != "base":
                n = int(label[2:])
                step(power_law(b, n, rng), False, plan)  # refills the static plan
            row[label] = event_ms(g.replay)
        results["decode"].append(row)
        print(f"decode batch {b:4d}: " + "  ".join(f"{k} {v:.3f}" + ("" if k == "base" else f" (x{v / row['base']:.3f})")
                                                   for k, v in row.items() if k != "batch"))
    b = a.eager_batch
    x = inputs(b)
    for n in (0, 100):
        issue = wall = 0.0
        for i in range(6):  # host time to issue a step (queue empty at its start), then the step's wall time
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            layers(x, step(power_law(b, n, rng), False) if n else None)
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            if i:
                issue, wall = issue + (t1 - t0) / 5, wall + (time.perf_counter() - t0) / 5
        print(f"eager decode batch {b}, N={n}: host issue {issue * 1e3:.3f} ms, wall {wall * 1e3:.3f} ms", flush=True)
    if a.host_profile:  # where the host time of an eager step goes
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5):
            layers(x, step(power_law(b, 100, rng), False))
        prof.disable()
        torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    t = a.prefill_tokens
    x = inputs(t)
    row = {"tokens": t, "base": event_ms(lambda: layers(x, None), 5)}
    for n in (int(v) for v in a.adapters.split(",")):
        per = max(1, t // 8)  # 8 prompts, each on one adapter
        slots = np.repeat(power_law(8, n, rng), per)[:t]
        slots = np.concatenate([slots, np.full(t - len(slots), slots[-1])])
        row[f"N={n}"] = event_ms(lambda: layers(x, step(slots, True)), 5)
    results["prefill"].append(row)
    print(f"prefill {t} tokens (8 prompts): " + "  ".join(
        f"{k} {v:.2f}" + ("" if k == "base" else f" (x{v / row['base']:.3f})") for k, v in row.items() if k != "tokens"))
    if a.out:
        a.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
