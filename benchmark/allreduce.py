"""The collectives of one tensor-parallel decode step, timed alone (#16: "the all-reduce time per
step reported"). For a model's config.json and each batch size: one all-reduce of the embedding
rows, two per layer (after o_proj and after down_proj), and one all-gather of the logits, each of
the shape and dtype the shard uses, through the shard's own `parallel.Group` (NCCL on CUDA, gloo
on the CPU). On CUDA the step's collectives are also captured in a CUDA graph and replayed, as the
shard's decode graphs run them.

    python benchmark/allreduce.py MODEL_DIR --num-shard 2 --batches 1,64 [--out F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import capture  # noqa: E402
from ports import free_port  # noqa: E402


def step_collectives(group, b: int, hidden: int, layers: int, vocab_share: int, dtype, device):
    """A function running one decode step's collectives on fixed buffers."""
    rows = torch.ones(b, hidden, dtype=dtype, device=device)
    logits = torch.ones(b, vocab_share, dtype=dtype, device=device)  # gathered before the cast to float32

    def run():
        group.all_reduce(rows)  # the embedding (vocabulary-parallel)
        for _ in range(layers):
            group.all_reduce(rows)  # o_proj's partial sums
            group.all_reduce(rows)  # down_proj's partial sums
        return group.all_gather(logits)

    return run


def time_ms(fn, iters: int, device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]) * 1e3


def worker(rank: int, world: int, port: int, cfg: dict, batches: list[int], iters: int, out: str | None):
    from text_generation_server.parallel import init_group

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    group = init_group(rank, world, "127.0.0.1", port, device)
    dtype = torch.bfloat16 if cuda else torch.float32
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    vocab_share = -(-cfg["vocab_size"] // world)
    rows = []
    for b in batches:
        run = step_collectives(group, b, hidden, layers, vocab_share, dtype, device)
        row = {"batch": b, "collectives": 2 * layers + 2, "eager_ms": time_ms(run, iters, device)}
        if cuda:
            graph = capture(run)
            row["graph_ms"] = time_ms(graph.replay, iters, device)
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    if rank == 0 and out:
        Path(out).write_text(json.dumps({"num_shard": world, "dtype": str(dtype), "steps": rows}, indent=2))
    torch.distributed.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--num-shard", type=int, default=2)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.num_shard < 2:
        sys.exit("--num-shard must be at least 2: one shard has no collectives")
    if not (a.model_dir / "config.json").is_file():
        sys.exit(f"{a.model_dir}: no config.json")
    cfg = json.loads((a.model_dir / "config.json").read_text())
    port = free_port()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    mp.spawn(worker, args=(a.num_shard, port, cfg, [int(x) for x in a.batches.split(",")], a.iters,
                           str(a.out) if a.out else None), nprocs=a.num_shard)


if __name__ == "__main__":
    main()
