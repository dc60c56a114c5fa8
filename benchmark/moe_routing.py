"""How many experts a mixture-of-experts model's decode steps actually read: the model in this
process (eager, no CUDA graphs), B random prompts prefilled then decoded, every mixture layer's
distinct chosen experts counted per step. The roofline of `shard_bench.py` assumes uniform
routing (`make_model.step_weight_bytes`); this checks that assumption on the same model.

    python benchmark/moe_routing.py /tmp/mixtral --batches 1,64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server" / "tests"))
from shard_calls import batch  # noqa: E402
from text_generation_server.engine import Engine, EngineConfig  # noqa: E402
from text_generation_server.layers.moe import SparseMoe  # noqa: E402
from text_generation_server.layers import moe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    eng = Engine(EngineConfig(a.model_dir, torch.bfloat16 if dev.type == "cuda" else torch.float32, dev, block_size=4))
    eng.warmup(batch(99, [[1, 2, 3]], 1)[0], 0, max_total_tokens=a.context + a.steps + 4)
    counts: list[int] = []
    route = moe.route

    def counting(logits, top_k, renormalize):
        w, ids = route(logits, top_k, renormalize)
        counts.append(int(torch.unique(ids).numel()))
        return w, ids

    moe.route = counting
    vocab = eng.model.config.vocab_size
    rng = np.random.default_rng(0)
    layers = sum(isinstance(layer.mlp, SparseMoe) for layer in eng.model.layers)
    out = {}
    for b in (int(x) for x in a.batches.split(",")):
        prompts = [rng.integers(0, vocab, a.context).tolist() for _ in range(b)]
        res, cached = eng.prefill(batch(1, prompts, a.steps + 1)[0])
        counts.clear()
        for _ in range(a.steps):
            res, cached, _ = eng.decode([cached.id])
        out[b] = {"experts_per_layer_mean": statistics.mean(counts), "layers": layers, "steps": a.steps,
                  "uniform_expectation": None}
        e, k = eng.model.config.num_experts, eng.model.config.experts_per_token
        out[b]["uniform_expectation"] = e * (1 - (1 - k / e) ** b)
        eng.clear(None)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
