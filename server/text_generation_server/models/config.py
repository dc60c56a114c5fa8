"""Model configuration parsed from a model directory's config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """config.json is missing a field or holds a value we cannot serve."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    """Base of the rotary frequencies."""
    kind: str = "default"
    """'default', 'linear' or 'llama3'."""
    factor: float = 1.0
    """Scaling factor ('linear', 'llama3')."""
    low_freq_factor: float = 1.0
    """Llama-3 scaling: wavelengths above original_max / low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """Llama-3 scaling: wavelengths below original_max / high_freq_factor are left alone."""
    original_max_position_embeddings: int = 8192
    """Llama-3 scaling: context length the model was trained at."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    """First entry of config.json's `architectures`."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    """Qwen2 has biases on q/k/v; Llama and Mistral do not (unless attention_bias)."""
    sliding_window: int | None
    eos_token_ids: tuple[int, ...] = field(default=())

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path} not found")
        raw = json.loads(path.read_text())
        gen_path = Path(model_dir) / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        return cls.from_dict(raw, gen)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], gen: dict[str, Any] | None = None) -> "ModelConfig":
        def need(key: str) -> Any:
            if raw.get(key) is None:
                raise ConfigError(f"config.json: missing field {key!r}")
            return raw[key]

        archs = raw.get("architectures") or ["LlamaForCausalLM"]
        model_type = raw.get("model_type", "llama")
        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ConfigError(f"config.json: num_attention_heads {heads} not a multiple of num_key_value_heads {kv_heads}")
        head_dim = int(raw.get("head_dim") or hidden // heads)
        max_pos = int(raw.get("max_position_embeddings", 4096))
        window = raw.get("sliding_window") if raw.get("use_sliding_window", True) else None
        if model_type == "qwen2" and not raw.get("use_sliding_window", False):
            window = None
        eos = (gen or {}).get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=archs[0],
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=_rope(raw, max_pos),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=bool(raw.get("attention_bias", model_type == "qwen2")),
            sliding_window=int(window) if window else None,
            eos_token_ids=eos_ids,
        )


def _rope(raw: dict[str, Any], max_pos: int) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta inside); older configs `rope_theta` + `rope_scaling`.
    params = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {})
    params.update(scaling)
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, kind=kind, factor=float(params["factor"]))
    if kind == "llama3":
        return RopeConfig(
            theta=theta,
            kind=kind,
            factor=float(params["factor"]),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings", max_pos)),
        )
    raise ConfigError(f"config.json: rope scaling type {kind!r} is not supported (default, linear, llama3 are)")
