"""PEFT LoRA adapters: loading, validation against the base model, scaling."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from text_generation_server.errors import ErrorCode, ShardError
from text_generation_server.models.config import ModelConfig

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Projections of one input, computed together (one GEMM on CUDA, one LoRA shrink for the group).
GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$")


def peft_key(layer: int, proj: str, ab: str) -> str:
    """The tensor name peft saves for one LoRA matrix (`ab`: "A" or "B"); `_KEY` reads it back."""
    part = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"base_model.model.model.layers.{layer}.{part}.{proj}.lora_{ab}.weight"


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Projection name -> (out features, in features) of the base model."""
    h, d = cfg.hidden_size, cfg.head_dim
    return {
        "q_proj": (cfg.num_heads * d, h), "k_proj": (cfg.num_kv_heads * d, h), "v_proj": (cfg.num_kv_heads * d, h),
        "o_proj": (h, cfg.num_heads * d), "gate_proj": (cfg.intermediate_size, h), "up_proj": (cfg.intermediate_size, h),
        "down_proj": (h, cfg.intermediate_size),
    }


@dataclass
class Adapter:
    name: str
    rank: int
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA
    # (layer, projection) -> (A [r, in], B [out, r]), on the model's device and dtype
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def bad(name: str, why: str) -> ShardError:
    return ShardError(ErrorCode.BAD_ADAPTER, f"adapter {name!r}: {why}")


def load_adapter(name: str, path: Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> Adapter:
    """Reads a PEFT directory onto `device` (via the host)."""
    return to_device(read_adapter(name, path, cfg, dtype), device)


def to_device(host: Adapter, device: torch.device) -> Adapter:
    """Copies a host adapter to the device; on CUDA through pinned memory on a side stream, so a
    step running meanwhile is not serialized behind the copy."""
    if device.type != "cuda":
        return Adapter(host.name, host.rank, host.scaling, {k: (a.to(device), b.to(device)) for k, (a, b) in host.weights.items()})
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        weights = {k: (a.pin_memory().to(device, non_blocking=True), b.pin_memory().to(device, non_blocking=True))
                   for k, (a, b) in host.weights.items()}
    stream.synchronize()
    return Adapter(host.name, host.rank, host.scaling, weights)


def read_adapter(name: str, path: Path, cfg: ModelConfig, dtype: torch.dtype) -> Adapter:
    """Reads a PEFT directory into host memory in `dtype`; a shape or target mismatch with the base
    model is a BAD_ADAPTER error."""
    conf_path, weights_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not conf_path.is_file() or not weights_path.is_file():
        raise ShardError(ErrorCode.ADAPTER_NOT_FOUND, f"adapter {name!r}: no adapter_config.json + adapter_model.safetensors in {path.name}")
    try:
        conf = json.loads(conf_path.read_text())
        raw = load_file(str(weights_path))
    except Exception as e:  # noqa: BLE001 - any unreadable file is the adapter's fault
        raise bad(name, f"unreadable: {e}") from e
    if conf.get("peft_type", "LORA") != "LORA":
        raise bad(name, f"peft_type {conf.get('peft_type')!r} is not LORA")
    r = int(conf.get("r", 0))
    if not 1 <= r <= 256:
        raise bad(name, f"rank {r} outside 1..256")
    alpha = float(conf.get("lora_alpha", r))
    scaling = alpha / (r ** 0.5) if conf.get("use_rslora") else alpha / r
    shapes = projection_shapes(cfg)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        m = _KEY.search(key)
        if not m:
            raise bad(name, f"unexpected tensor {key!r} (only q/k/v/o/gate/up/down LoRA A/B are supported)")
        layer, proj, ab = int(m.group(1)), m.group(2), m.group(3)
        if proj not in shapes:
            raise bad(name, f"targets {proj!r}, which the base model does not have")
        if layer >= cfg.num_layers:
            raise bad(name, f"layer {layer} beyond the base model's {cfg.num_layers}")
        pairs.setdefault((layer, proj), {})[ab] = t
    weights = {}
    for (layer, proj), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise bad(name, f"layer {layer} {proj}: lora_A and lora_B must both be present")
        out_f, in_f = shapes[proj]
        a, b = ab["A"], ab["B"]
        if tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
            raise bad(name, f"layer {layer} {proj}: shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit "
                            f"rank {r} and the base model's ({out_f}, {in_f})")
        weights[(layer, proj)] = (a.to(dtype).contiguous(), b.to(dtype).contiguous())
    if not weights:
        raise bad(name, "no LoRA weights")
    return Adapter(name, r, scaling, weights)
