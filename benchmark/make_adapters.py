"""Writes N random-weight PEFT LoRA adapters for a model directory (W3: rank 16 on q/k/v/o/gate/up/down).

Each adapter is `OUT/a<i>` with adapter_config.json and adapter_model.safetensors (bf16), the layout
peft saves. Weights are random (std 0.01 for A and B): they change the model's output, which is all a
throughput benchmark needs. Generated on the GPU when there is one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))
from text_generation_server.lora.adapter import PROJECTIONS, peft_key, projection_shapes  # noqa: E402
from text_generation_server.models.config import ModelConfig  # noqa: E402

def write(model_dir: Path, out: Path, n: int, rank: int, targets: list[str], device: str) -> None:
    cfg = ModelConfig.from_dir(model_dir)
    sh = projection_shapes(cfg)
    g = torch.Generator(device=device)
    for i in range(n):
        g.manual_seed(i)
        tensors = {}
        for layer in range(cfg.num_layers):
            for t in targets:
                out_f, in_f = sh[t]
                for ab, shape in (("A", (rank, in_f)), ("B", (out_f, rank))):
                    w = torch.randn(*shape, generator=g, device=device) * 0.01
                    tensors[peft_key(layer, t, ab)] = w.to(torch.bfloat16).cpu()
        d = out / f"a{i}"
        d.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets,
            "base_model_name_or_path": str(model_dir)}))


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
