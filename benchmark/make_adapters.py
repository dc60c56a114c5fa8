"""Writes N random-weight PEFT LoRA adapters for a model directory (W3: rank 16 on q/k/v/o/gate/up/down).

Each adapter is `OUT/a<i>` with adapter_config.json and adapter_model.safetensors (bf16), the layout
peft saves. Weights are random (std 0.01 for A and B): they change the model's output, which is all a
throughput benchmark needs. Generated on the GPU when there is one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

PROJECTIONS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kvh = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    d = cfg.get("head_dim") or h // heads
    return {"q_proj": (heads * d, h), "k_proj": (kvh * d, h), "v_proj": (kvh * d, h), "o_proj": (h, heads * d),
            "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}


def write(model_dir: Path, out: Path, n: int, rank: int, targets: list[str], device: str) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    sh = shapes(cfg)
    g = torch.Generator(device=device)
    for i in range(n):
        g.manual_seed(i)
        tensors = {}
        for layer in range(cfg["num_hidden_layers"]):
            for t in targets:
                out_f, in_f = sh[t]
                key = f"base_model.model.model.layers.{layer}.{PROJECTIONS[t]}.{t}"
                for ab, shape in (("A", (rank, in_f)), ("B", (out_f, rank))):
                    w = torch.randn(*shape, generator=g, device=device) * 0.01
                    tensors[f"{key}.lora_{ab}.weight"] = w.to(torch.bfloat16).cpu()
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
