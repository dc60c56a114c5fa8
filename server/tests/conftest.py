"""Shared fixtures: tiny random-weight models written by transformers, so our model code is
compared with transformers' on the same weights (no hub access)."""

from __future__ import annotations

import pytest
import torch

from text_generation_server.pb import generate_pb2 as pb

BLOCK = 4


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


def request(rid: int, ids: list[int], max_new: int, first_block: int, *, temperature=1.0, top_k=0, top_p=1.0,
            do_sample=False, seed=0, rep=1.0, ignore_eos=True) -> tuple[pb.Request, int]:
    n = -(-(len(ids) + max_new) // BLOCK)
    blocks = list(range(first_block, first_block + n))
    slots = [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(len(ids))]
    params = pb.NextTokenChooserParameters(temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample,
                                           seed=seed, repetition_penalty=rep, typical_p=1.0)
    stop = pb.StoppingCriteriaParameters(max_new_tokens=max_new, ignore_eos_token=ignore_eos)
    return pb.Request(id=rid, input_ids=ids, parameters=params, stopping_parameters=stop, blocks=blocks,
                      slots=slots), first_block + n


def batch(bid: int, prompts: list[list[int]], max_new: int, first_block: int = 0, first_id: int = 0, **kw):
    reqs = []
    for i, ids in enumerate(prompts):
        r, first_block = request(first_id + i, ids, max_new, first_block, **kw)
        reqs.append(r)
    return pb.Batch(id=bid, requests=reqs, size=len(reqs)), first_block


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
