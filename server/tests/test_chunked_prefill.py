"""Chunked prefill in mixed steps: long prompts computed a few tokens per step, in the same
forward as other requests' decode rows (the router's token budget), must produce what each
request produces alone: same tokens (greedy, penalties, seeded sampling), same logprobs within
float tolerance; with overlapped steps on and off (with overlap the chunks ride on the step
launched ahead)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import batch, write_tiny
from shard_calls import alone, chunked_script, request, script_requests
from test_lora import write_adapter
from text_generation_server.models.config import ModelConfig


@pytest.fixture
def make_engine(tmp_path, monkeypatch):
    from text_generation_server.engine import Engine, EngineConfig

    path, _ = write_tiny(tmp_path, "llama")

    src = tmp_path / "adapters"
    cfg = ModelConfig.from_dict(json.loads((path / "config.json").read_text()))
    write_adapter(src / "qkvo", 8, ("q_proj", "k_proj", "v_proj", "o_proj"), seed=1, cfg=cfg)
    write_adapter(src / "mlp", 4, ("gate_proj", "up_proj", "down_proj"), seed=2, cfg=cfg)

    def make(overlap: bool, lora: bool = False):
        monkeypatch.setenv("TESSERA_OVERLAP", "1" if overlap else "0")
        eng = Engine(EngineConfig(path, torch.float32, torch.device("cpu"), block_size=4,
                                  adapter_source=src if lora else None))
        warm, _ = batch(999, [[2, 3, 4]], 1)
        eng.warmup(warm, 256)
        return eng

    return make


def reference(eng, adapters=None) -> dict:
    """The script's four requests, each alone."""
    return {r.id: alone(eng, r, (adapters or {}).get(r.id)) for r in script_requests()}


def check(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for rid in want:
        assert got[rid][0] == want[rid][0], rid
        np.testing.assert_allclose(got[rid][1], want[rid][1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("chunk", [3, 5, 8, 64])
def test_chunks_in_mixed_steps_match_each_request_alone(make_engine, overlap, chunk):
    check(chunked_script(make_engine(overlap), chunk), reference(make_engine(False)))


@pytest.mark.parametrize("chunk", [3, 8])
def test_chunks_carrying_the_whole_prompt_match_too(make_engine, chunk):
    """The other form the contract allows: every chunk with the whole prompt (input_len unset)."""
    check(chunked_script(make_engine(True), chunk, sliced=False), reference(make_engine(False)))


@pytest.mark.parametrize("chunk", [3, 64])
def test_chunks_with_adapters_match_each_request_alone(make_engine, chunk):
    """Adapters on decoding rows and on chunked prompts (attention and MLP targets)."""
    adapters = {0: "qkvo", 20: "qkvo", 21: "mlp"}
    check(chunked_script(make_engine(True, lora=True), chunk, adapters), reference(make_engine(False, lora=True), adapters))


def test_a_partial_chunk_returns_nothing_and_joins_nothing(make_engine):
    from text_generation_server.pb import generate_pb2 as pb

    eng = make_engine(False)
    r, _ = request(3, list(range(2, 22)), 4, 0)
    r.compute_tokens = 8
    res, cached = eng.prefill(pb.Batch(id=5, requests=[r]))
    assert res.request_ids == [] and not res.failed and cached is None
    assert 5 not in eng.batches
