"""Where a decode step's time goes: the engine in-process (no gRPC), torch.profiler over steps.

With `--adapters DIR --num-adapters N` (DIR from make_adapters.py), row i uses adapter a<i mod N>:
the W3 step, with the prefill of that batch timed too."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))
from text_generation_server.engine import Engine, EngineConfig  # noqa: E402
from text_generation_server.pb import generate_pb2 as pb  # noqa: E402

BS = 16


def batch(bid, b, ctx, steps, vocab, num_adapters=0, first=0):
    """Requests first..first+b-1 (their blocks follow the earlier requests' blocks)."""
    rng = np.random.default_rng(first)
    n = -(-(ctx + steps + 2) // BS)
    reqs = []
    for i in range(first, first + b):
        bl = list(range(i * n, (i + 1) * n))
        reqs.append(pb.Request(id=i, input_ids=rng.integers(0, vocab, ctx).tolist(), blocks=bl,
                               cache_locs=[bl[p // BS] * BS + p % BS for p in range(ctx)],
                               parameters=pb.NextTokenChooserParameters(temperature=1, top_p=1, typical_p=1, repetition_penalty=1),
                               stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=steps + 2, ignore_eos_token=True)))
        if num_adapters:
            reqs[-1].adapter_id = f"a{i % num_adapters}"
    return pb.Batch(id=bid, requests=reqs, size=b)


PREFILL_ROWS = 16  # requests per prefill (the whole batch at once would not fit its activations)


def prefill_all(eng, bid, b, ctx, steps, vocab, num_adapters=0) -> int:
    """Prefills b requests as batches of PREFILL_ROWS, then merges them with a first decode step;
    returns the merged batch's id."""
    ids = []
    for k, first in enumerate(range(0, b, PREFILL_ROWS)):
        ids.append(bid * 1000 + k)
        eng.prefill(batch(ids[-1], min(PREFILL_ROWS, b - first), ctx, steps, vocab, num_adapters, first))
    eng.decode(ids)
    return ids[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--graphs", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--adapters", type=Path, default=None, help="adapter source (make_adapters.py output)")
    ap.add_argument("--num-adapters", type=int, default=0)
    ap.add_argument("--max-lora-rank", type=int, default=16)
    ap.add_argument("--profile", action="store_true", help="and torch.profiler tables of 5 steps")
    a = ap.parse_args()
    graphs = tuple(int(x) for x in a.graphs.split(",") if int(x) > 0)
    eng = Engine(EngineConfig(a.model_dir, torch.bfloat16, torch.device("cuda"), block_size=BS, cuda_graphs=graphs,
                              adapter_source=a.adapters, max_active_adapters=max(a.num_adapters, 1),
                              max_lora_rank=a.max_lora_rank))
    vocab = eng.model.config.vocab_size
    eng.warmup(batch(99, 1, 256, 1, vocab), 0, max_total_tokens=a.context + 64)
    n_ad = a.num_adapters if a.adapters else 0
    if n_ad:
        eng.adapters.get({f"a{i}" for i in range(n_ad)})  # resident before timing
        for i in range(2):  # compile and time the prefill of the adapter batch
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            eng.prefill(batch(50 + i, min(a.batch, PREFILL_ROWS), a.context, 1, vocab, n_ad))
            torch.cuda.synchronize()
            eng.clear(50 + i)
        print(f"prefill with {n_ad} adapters: {(time.perf_counter() - t0) * 1e3:.2f} ms (batch {min(a.batch, PREFILL_ROWS)} x {a.context} tokens)")
    def decode_wall(bid, adapters):
        bid = prefill_all(eng, bid, a.batch, a.context, 40, vocab, adapters)
        for _ in range(5):
            eng.decode([bid])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            eng.decode([bid])
        return (time.perf_counter() - t0) / 20, bid

    if n_ad:  # the same batch on the base model first, in the same engine
        base, bid = decode_wall(2, 0)
        eng.clear(bid)
        print(f"engine.decode wall, base rows: {base * 1e3:.2f} ms/step")
    wall, bid = decode_wall(1, n_ad)
    print(f"engine.decode wall: {wall * 1e3:.2f} ms/step (batch {a.batch}, context {a.context}, "
          f"{n_ad} adapters, graphs {graphs})" + (f", x{wall / base:.3f} of base" if n_ad else ""))
    if a.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                eng.decode([bid])
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_ms = sum(e.time_range.elapsed_us() for e in kernels) / 5 / 1e3
        layers = eng.model.config.num_layers
        print(f"kernels per decode step: {len(kernels) / 5:.0f} ({len(kernels) / 5 / layers:.1f} per layer, "
              f"{layers} layers; layer ops: {eng.model.ops.name})")
        print(f"GPU busy per step: {busy_ms:.3f} ms of {wall * 1e3:.3f} ms wall ({busy_ms / (wall * 1e3):.2f})")

if __name__ == "__main__":
    main()
