"""Shared fixtures: tiny random-weight models written by transformers, so our model code is
compared with transformers' on the same weights (no hub access)."""

from __future__ import annotations

import pytest
import torch

from shard_calls import BLOCK, batch, request  # noqa: F401 - the tests import them from here


def write_tiny(tmp_path, kind: str):
    """A random-weight model directory of a small Llama/Qwen2/Mistral-shaped config."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, eos_token_id=1, bos_token_id=0)
    if kind == "llama":
        cfg, cls = LlamaConfig(**common, tie_word_embeddings=False), LlamaForCausalLM
    elif kind == "llama3":
        cfg = LlamaConfig(**common, rope_theta=500000.0, tie_word_embeddings=True,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        cls = LlamaForCausalLM
    elif kind == "qwen2":
        cfg, cls = Qwen2Config(**common, tie_word_embeddings=True), Qwen2ForCausalLM
    elif kind == "mistral":
        cfg, cls = MistralConfig(**common, sliding_window=None), MistralForCausalLM
    else:
        raise ValueError(kind)
    model = cls(cfg).eval()
    out = tmp_path / kind
    model.save_pretrained(out, safe_serialization=True)
    return out, model


@pytest.fixture
def engine_factory(tmp_path):
    from text_generation_server.engine import Engine, EngineConfig

    def make(kind: str, num_blocks: int = 256):
        path, ref = write_tiny(tmp_path, kind)
        eng = Engine(EngineConfig(path, torch.float32, torch.device("cpu"), block_size=BLOCK))
        warm, _ = batch(999, [[2, 3, 4]], 1)
        eng.warmup(warm, num_blocks)
        return eng, ref

    return make
