"""Model registry: config.json's `architectures` -> model class, one file per family (look-alike
architectures share one), built from the shared layers of `common.py`.

Model modules are imported when a model is loaded, not with this package, so that layers and
per-step helpers under `models/` import without pulling every model in."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from text_generation_server.models.config import ConfigError, ModelConfig
from text_generation_server.weights.loader import Weights

REGISTRY = {  # architecture -> (module under models/, class)
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "Gemma2ForCausalLM": ("gemma", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma", "Gemma3ForCausalLM"),
    "Gemma3ForConditionalGeneration": ("gemma", "Gemma3ForCausalLM"),  # its text model
    "Phi3ForCausalLM": ("phi3", "Phi3ForCausalLM"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen_moe", "Qwen3MoeForCausalLM"),
    "Qwen2MoeForCausalLM": ("qwen_moe", "Qwen2MoeForCausalLM"),
}


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device, group=None):
    """This rank's share of the model (all of it at world size 1, `group` None): only its slices
    are read. `group`: the shard's `parallel.Group`."""
    from text_generation_server.parallel import SINGLE, Split  # parallel imports models.config

    group = group or SINGLE
    cfg = ModelConfig.from_dir(model_dir)
    entry = REGISTRY.get(cfg.architecture)
    if entry is None:
        raise ConfigError(f"architecture {cfg.architecture!r} is not supported (supported: {sorted(REGISTRY)})")
    module, name = entry
    cls = getattr(importlib.import_module(f"text_generation_server.models.{module}"), name)
    split = Split.of(cfg, group.rank, group.world)
    weights = Weights(model_dir, dtype, device)
    model = cls(cfg, weights, split, group)
    model.num_parameters = weights.numel
    return model
