"""Our Llama-family model against transformers on the same random weights."""

from __future__ import annotations

import pytest
import torch

from conftest import batch
from shard_calls import prompt_logits

KINDS = ["llama", "llama3", "qwen2", "mistral"]


def ref_greedy(ref, ids: list[int], n: int) -> list[int]:
    out = ref.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_logits_match_transformers(engine_factory, kind):
    eng, ref = engine_factory(kind)
    torch.manual_seed(1)
    ids = torch.randint(2, 97, (37,)).tolist()
    ours = prompt_logits(eng, ids)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_decode_matches_transformers_alone_and_batched(engine_factory, kind):
    eng, ref = engine_factory(kind)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, 97, (n,), generator=g).tolist() for n in (5, 17, 9)]
    n = 12
    want = [ref_greedy(ref, p, n) for p in prompts]
    pb_batch, _ = batch(1, prompts, n)
    res, _ = eng.prefill(pb_batch)
    got = [[int(t)] for t in res.token_ids]
    for _ in range(n - 1):
        res, _, _ = eng.decode([1])
        for row, t in enumerate(res.token_ids):
            got[row].append(int(t))
    assert got == want
    assert list(res.finish) == [1, 1, 1]  # LENGTH on the last step


def test_config_errors_name_the_field(tmp_path):
    from text_generation_server.models.config import ConfigError, ModelConfig

    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_dict({"vocab_size": 10})
    base = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}
    with pytest.raises(ConfigError, match="mlp_bias"):
        ModelConfig.from_dict({**base, "mlp_bias": True})
    with pytest.raises(ConfigError, match="use_bidirectional_attention"):
        ModelConfig.from_dict({**base, "model_type": "gemma3_text", "use_bidirectional_attention": True})
    with pytest.raises(ConfigError, match="activation 'relu2'"):
        ModelConfig.from_dict({**base, "hidden_act": "relu2"})
    with pytest.raises(ConfigError, match="layer type 'chunked_attention' is not supported"):  # no window either
        ModelConfig.from_dict({**base, "layer_types": ["chunked_attention"]})
    with pytest.raises(ConfigError, match="layer_types has 2 entries for 1 layers"):
        ModelConfig.from_dict({**base, "sliding_window": 4, "layer_types": ["full_attention"] * 2})
    with pytest.raises(ConfigError, match="yarn"):
        ModelConfig.from_dict({"vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_wrong_weight_shape_is_a_clear_error(tmp_path, engine_factory):
    import json

    from text_generation_server.models import load_model
    from text_generation_server.weights.loader import WeightError
    from conftest import write_tiny

    path, _ = write_tiny(tmp_path, "llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightError, match="gate_proj"):
        load_model(path, torch.float32, torch.device("cpu"))
