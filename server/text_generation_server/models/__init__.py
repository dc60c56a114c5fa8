"""Model registry: architecture name -> model class. Look-alike architectures share one file."""

from __future__ import annotations

from pathlib import Path

import torch

from text_generation_server.models.config import ConfigError, ModelConfig
from text_generation_server.models.llama import LlamaForCausalLM
from text_generation_server.weights.loader import Weights

REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device):
    cfg = ModelConfig.from_dir(model_dir)
    cls = REGISTRY.get(cfg.architecture)
    if cls is None:
        raise ConfigError(f"architecture {cfg.architecture!r} is not supported (supported: {sorted(REGISTRY)})")
    return cls(cfg, Weights(model_dir, dtype, device))
