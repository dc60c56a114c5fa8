"""Each model family beyond Llama served end to end (the real launcher, router and shard over
HTTP) on a tiny random-weight model made by transformers (`server/tests/families.py`) with the
default model's tokenizer: greedy answers equal transformers' `generate` alone, batched, with
prompts chunked 12 tokens a step (windows of 8 across chunks), from the prefix cache, and with a
peft adapter beside base requests."""

from __future__ import annotations

import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch

from conftest import ROOT, Server

sys.path.insert(0, str(ROOT / "server" / "tests"))
import families  # noqa: E402

TEXTS = ["The capital of France is", "Write a haiku about the sea and the sky at night, please.",
         "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"]
N = 12


@pytest.fixture(scope="module", params=families.FAMILIES)
def served(request, tmp_path_factory, model_dir):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    path, ref = families.write(root / "m", kind, vocab=49152)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / f, path / f)
    lora = families.adapter(root / "lora", path, kind)
    if kind in families.MOE:
        _experts_adapter(root / "src" / "experts", ref, kind)
    (root / "src").mkdir(exist_ok=True)
    s = Server("--model-id", str(path), "--lora-adapters", f"a={lora}", "--adapter-source", str(root / "src"),
               "--max-input-tokens", "128",
               "--max-total-tokens", "200", "--max-batch-tokens", "16", "--max-batch-prefill-tokens", "12").wait_ready()
    yield kind, s, ref, Path(lora)
    assert s.stop() == 0


def generate(server, text: str, adapter: str | None = None) -> tuple[list[int], list[int]]:
    params = {"max_new_tokens": N, "details": True, "decoder_input_details": True}
    if adapter:
        params["adapter_id"] = adapter
    r = requests.post(server.url("/generate"), json={"inputs": text, "parameters": params}, timeout=300)
    assert r.status_code == 200, r.text
    d = r.json()["details"]
    return [t["id"] for t in d["prefill"]], [t["id"] for t in d["tokens"]]


def test_served_like_transformers_alone_batched_chunked_and_cached(served):
    kind, s, ref, _ = served
    alone = [generate(s, t) for t in TEXTS]
    for ids, got in alone:
        assert got == families.greedy(ref, ids, N), kind
    with ThreadPoolExecutor(len(TEXTS)) as ex:  # one batch; the longer prompts in chunks of 12
        together = list(ex.map(lambda t: generate(s, t), TEXTS))
    assert together == alone
    assert generate(s, TEXTS[2]) == alone[2]  # its prefix from the cache this time
    assert requests.get(s.url("/info"), timeout=10).json()["model_id"].endswith("/m")


def test_adapter_rows_match_peft_beside_base_rows(served):
    from peft import PeftModel

    kind, s, ref, lora = served
    with ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda a: generate(s, TEXTS[1], a), ["a", None, "a", None]))
    tuned = PeftModel.from_pretrained(ref, lora).eval()
    ids = outs[0][0]
    try:
        want = families.greedy(tuned, ids, N)
    finally:
        tuned.unload()
    assert outs[0][1] == outs[2][1] == want, kind
    assert outs[1][1] == outs[3][1] == families.greedy(ref, ids, N)
    assert want != outs[1][1]


def _experts_adapter(src: Path, ref, kind: str) -> None:
    """A LoRA adapter on an expert's gate projection (what peft writes for target_modules=["w1"]
    on Mixtral, or ["gate_proj"] on Qwen-MoE)."""
    from safetensors.torch import save_file

    src.mkdir(parents=True)
    name = "block_sparse_moe.experts.0.w1" if kind == "mixtral" else "mlp.experts.0.gate_proj"
    (src / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4}')
    inter = ref.config.intermediate_size if kind == "mixtral" else ref.config.moe_intermediate_size
    save_file({f"base_model.model.model.layers.0.{name}.lora_A.weight": torch.zeros(2, ref.config.hidden_size),
               f"base_model.model.model.layers.0.{name}.lora_B.weight": torch.zeros(inter, 2)},
              str(src / "adapter_model.safetensors"))


def test_lora_on_experts_is_refused_with_a_clear_4xx(served):
    kind, s, _, _ = served
    if kind not in families.MOE:
        pytest.skip("dense: every projection takes LoRA")
    r = requests.post(s.url("/generate"), json={"inputs": "hi", "parameters": {"adapter_id": "experts"}}, timeout=60)
    assert 400 <= r.status_code < 500, r.text
    assert "mixture-of-experts MLP" in r.json()["error"], r.text
    assert generate(s, "hi")[1], "the server goes on serving"


def test_gemma3_multimodal_checkpoint_serves_its_text_model(tmp_path, model_dir):
    """A Gemma3ForConditionalGeneration checkpoint (Gemma 3 4B and up): the launcher serves its
    text model (text_config; the decoder under language_model.model; the image encoder unread),
    greedy equal to transformers' text-only generate."""
    ref = families.gemma3_multimodal(vocab=49152)
    path = tmp_path / "m"
    ref.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / f, path / f)
    s = Server("--model-id", str(path), "--max-input-tokens", "128", "--max-total-tokens", "200").wait_ready()
    try:
        for text_in in TEXTS:
            ids, got = generate(s, text_in)
            assert got == families.greedy(ref, ids, N)
    finally:
        assert s.stop() == 0
