"""Writes N random-weight PEFT LoRA adapters for a model directory (W3: rank 16 on q/k/v/o/gate/up/down).

Each adapter is `OUT/a<i>` with adapter_config.json and adapter_model.safetensors (bf16), the layout
peft saves. Weights are random (std 0.01 for A and B): they change the model's output, which is all a
throughput benchmark needs. Generated on the GPU when there is one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))
from text_generation_server.lora.adapter import PROJECTIONS, write_random_adapter  # noqa: E402
from text_generation_server.models.config import ModelConfig  # noqa: E402

def write(model_dir: Path, out: Path, n: int, rank: int, targets: list[str], device: str) -> None:
    cfg = ModelConfig.from_dir(model_dir)
    for i in range(n):
        write_random_adapter(out / f"a{i}", cfg, rank, targets, torch.Generator(device=device).manual_seed(i), 0.01,
                             torch.bfloat16, target_modules=targets, base_model_name_or_path=str(model_dir))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default=",".join(PROJECTIONS))
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    write(a.model_dir, a.out, a.n, a.rank, a.targets.split(","), device)
    print(f"wrote {a.n} rank-{a.rank} adapters to {a.out}")


if __name__ == "__main__":
    main()
