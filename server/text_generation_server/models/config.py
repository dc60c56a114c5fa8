"""Model configuration parsed from a model directory's config.json."""

from __future__ import annotations

import json
import math
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
    """'default', 'linear', 'llama3' or 'longrope' (Phi-3's 'su')."""
    factor: float = 1.0
    """Scaling factor ('linear', 'llama3')."""
    low_freq_factor: float = 1.0
    """Llama-3 scaling: wavelengths above original_max / low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """Llama-3 scaling: wavelengths below original_max / high_freq_factor are left alone."""
    original_max_position_embeddings: int = 8192
    """Llama-3 and LongRoPE scaling: context length the model was trained at."""
    short_factor: tuple[float, ...] = ()
    """LongRoPE: per-frequency divisors of sequences within original_max_position_embeddings."""
    long_factor: tuple[float, ...] = ()
    """LongRoPE: per-frequency divisors of sequences longer than that."""
    attention_factor: float = 1.0
    """LongRoPE: cos and sin are multiplied by it."""


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
    """The window of the layers that have one (None: none has)."""
    eos_token_ids: tuple[int, ...] = field(default=())
    model_type: str = "llama"
    layer_windows: tuple[int | None, ...] = ()
    """Each layer's attention window (None: the whole context); `sliding_window` on every layer
    when not given."""
    rope_local: RopeConfig | None = None
    """Gemma 3: the rotary embedding of sliding-window layers (None: `rope` everywhere)."""
    rotary_dim: int = 0
    """Leading dimensions of each head that are rotated (partial_rotary_factor; 0: all)."""
    hidden_act: str = "silu"
    """The MLP's activation: 'silu' or 'gelu_pytorch_tanh'."""
    attn_scale: float | None = None
    """Softmax scale of attention scores (None: 1 / sqrt(head_dim)); Gemma's query_pre_attn_scalar^-0.5."""
    attn_softcap: float | None = None
    """Gemma 2: scores become cap * tanh(score / cap)."""
    final_softcap: float | None = None
    """Gemma 2: logits become cap * tanh(logit / cap)."""
    qk_norm: bool = False
    """Qwen3, Gemma 3: an RMSNorm over each query and key head before the rotary embedding."""
    num_experts: int = 0
    """Routed experts of a mixture-of-experts MLP (0: a dense MLP)."""
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    """Renormalise the chosen experts' weights to sum to 1 (Mixtral always; Qwen3-MoE as configured)."""
    moe_layers: tuple[bool, ...] = ()
    """Whether each layer's MLP is the mixture (Qwen3-MoE's mlp_only_layers, decoder_sparse_step)."""
    shared_expert_intermediate_size: int = 0
    """Qwen2-MoE: a shared expert beside the routed ones, gated by a sigmoid (0: none)."""

    def __post_init__(self):
        # A config made by hand (tests) may leave the per-layer windows out: the same everywhere.
        if len(self.layer_windows) != self.num_layers:
            object.__setattr__(self, "layer_windows", (self.sliding_window,) * self.num_layers)

    @property
    def rotated(self) -> int:
        """The rotated dimensions of each head."""
        return self.rotary_dim or self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

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
        raw = _text_part(raw)

        def need(key: str) -> Any:
            if raw.get(key) is None:
                raise ConfigError(f"config.json: missing field {key!r}")
            return raw[key]

        archs = raw.get("architectures") or ["LlamaForCausalLM"]
        model_type = raw.get("model_type", "llama")
        for key, what in _UNSUPPORTED.items():  # refused, never silently ignored
            if raw.get(key):
                raise ConfigError(f"config.json: {key} ({what}) is not supported")
        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ConfigError(f"config.json: num_attention_heads {heads} not a multiple of num_key_value_heads {kv_heads}")
        head_dim = int(raw.get("head_dim") or hidden // heads)
        layers = int(need("num_hidden_layers"))
        max_pos = int(raw.get("max_position_embeddings", 4096))
        window = raw.get("sliding_window") if raw.get("use_sliding_window", True) else None
        if model_type in _QWEN and not raw.get("use_sliding_window", False):
            window = None
        windows = _layer_windows(raw, layers, int(window) if window else None)
        eos = (gen or {}).get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        rope_params = raw.get("rope_parameters") or {}
        per_type = isinstance(rope_params.get("full_attention"), dict)  # Gemma 3: a rope per layer type
        rope = _rope(raw, max_pos, rope_params.get("full_attention") if per_type else None)
        rope_local = None
        if per_type and isinstance(rope_params.get("sliding_attention"), dict):
            rope_local = _rope(raw, max_pos, rope_params["sliding_attention"])
        elif "rope_local_base_freq" in raw:  # Gemma 3 configs written before rope_parameters
            rope_local = RopeConfig(theta=float(raw["rope_local_base_freq"]))
        partial = float(raw.get("partial_rotary_factor", rope_params.get("partial_rotary_factor", 1.0)) or 1.0)
        rotary_dim = int(head_dim * partial) if partial < 1.0 else 0
        act = raw.get("hidden_activation") or raw.get("hidden_act") or "silu"
        if act not in ("silu", "gelu_pytorch_tanh"):
            raise ConfigError(f"config.json: activation {act!r} is not supported (silu, gelu_pytorch_tanh are)")
        gemma = model_type in ("gemma2", "gemma3_text")
        scalar = raw.get("query_pre_attn_scalar")
        experts = int(raw.get("num_local_experts") or raw.get("num_experts") or 0)
        moe_layers: tuple[bool, ...] = ()
        if experts:
            only_dense = set(raw.get("mlp_only_layers") or ())
            step = int(raw.get("decoder_sparse_step") or 1)
            moe_layers = tuple(i not in only_dense and (i + 1) % step == 0 for i in range(layers))
        return cls(
            architecture=archs[0],
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=rope,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", gemma)),
            qkv_bias=bool(raw.get("attention_bias", model_type in ("qwen2", "qwen2_moe"))),
            sliding_window=max((w for w in windows if w), default=None),
            eos_token_ids=eos_ids,
            model_type=model_type,
            layer_windows=windows,
            rope_local=rope_local,
            rotary_dim=rotary_dim,
            hidden_act=act,
            attn_scale=float(scalar) ** -0.5 if gemma and scalar else None,
            attn_softcap=_positive(raw.get("attn_logit_softcapping")) if gemma else None,
            final_softcap=_positive(raw.get("final_logit_softcapping")) if gemma else None,
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
            num_experts=experts,
            experts_per_token=int(raw.get("num_experts_per_tok") or 0) if experts else 0,
            moe_intermediate_size=int(raw.get("moe_intermediate_size") or raw.get("intermediate_size")) if experts else 0,
            norm_topk_prob=bool(raw.get("norm_topk_prob", True)) if experts else True,
            moe_layers=moe_layers,
            shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size") or 0) if experts else 0,
        )


# Checkpoints of a model with an image encoder whose text model we serve alone: the text part's
# config is `text_config` (the encoder's weights are never read; images are not accepted).
MULTIMODAL_TEXT = {"Gemma3ForConditionalGeneration": "gemma3_text"}

# What transformers assumes where a config leaves a field out (hub configs of Gemma 3 list only
# what differs from these).
_DEFAULTS = {
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                        max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1000000.0,
                        rope_local_base_freq=10000.0, query_pre_attn_scalar=256, sliding_window=4096,
                        sliding_window_pattern=6, eos_token_id=1),
}


def _text_part(raw: dict[str, Any]) -> dict[str, Any]:
    """The config of the model we run: a multimodal checkpoint's `text_config` (keeping its
    `architectures` and end-of-sequence ids), with the family's defaults under what it says."""
    archs = raw.get("architectures") or []
    if archs and archs[0] in MULTIMODAL_TEXT:
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"config.json: {archs[0]} without a text_config")
        top = {k: raw[k] for k in ("architectures", "eos_token_id") if k in raw}
        raw = {"model_type": MULTIMODAL_TEXT[archs[0]], **text, **top}
    return {**_DEFAULTS.get(raw.get("model_type", ""), {}), **raw}


# Qwen's families: a sliding window only with use_sliding_window, from layer max_window_layers on.
_QWEN = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")

_UNSUPPORTED = {
    "mlp_bias": "biases on the MLP projections",
    "use_bidirectional_attention": "attention without the causal mask, as in embedding models",
}


def _positive(v: Any) -> float | None:
    return float(v) if v else None


def _layer_windows(raw: dict[str, Any], layers: int, window: int | None) -> tuple[int | None, ...]:
    """Each layer's window: config.json's `layer_types` when it has them (Gemma 2/3, Qwen), else
    the same window (or none) for every layer."""
    types = raw.get("layer_types")
    if types:  # checked whether or not the model has a window: an unknown kind is refused, never ignored
        if len(types) != layers:
            raise ConfigError(f"config.json: layer_types has {len(types)} entries for {layers} layers")
        unknown = set(types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ConfigError(f"config.json: layer type {sorted(unknown)[0]!r} is not supported "
                              "(full_attention, sliding_attention are)")
    if window is None:
        return (None,) * layers
    if not types:
        if raw.get("model_type") == "gemma2":  # configs written before layer_types: even layers slide
            return tuple(window if i % 2 == 0 else None for i in range(layers))
        if raw.get("model_type") == "gemma3_text":
            pattern = int(raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern") or 6)
            return tuple(None if (i + 1) % pattern == 0 else window for i in range(layers))
        if raw.get("model_type") in _QWEN:
            first = int(raw.get("max_window_layers", layers))
            return tuple(window if i >= first else None for i in range(layers))
        return (window,) * layers
    return tuple(window if t == "sliding_attention" else None for t in types)


def _rope(raw: dict[str, Any], max_pos: int, params: dict[str, Any] | None = None) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta inside; Gemma 3 one per layer type); older
    # configs `rope_theta` + `rope_scaling`.
    if params is None:
        params = dict(raw.get("rope_parameters") or {})
        params.update(dict(raw.get("rope_scaling") or {}))
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
    if kind in ("longrope", "su"):
        original = int(params.get("original_max_position_embeddings") or raw.get("original_max_position_embeddings")
                       or max_pos)
        factor = params.get("factor") or max_pos / original
        attention = params.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        try:
            short, long = tuple(map(float, params["short_factor"])), tuple(map(float, params["long_factor"]))
        except (KeyError, TypeError, ValueError):
            raise ConfigError("config.json: longrope scaling needs short_factor and long_factor lists") from None
        return RopeConfig(theta=theta, kind="longrope", factor=float(factor), original_max_position_embeddings=original,
                          short_factor=short, long_factor=long, attention_factor=float(attention))
    raise ConfigError(f"config.json: rope scaling type {kind!r} is not supported (default, linear, llama3, longrope are)")
