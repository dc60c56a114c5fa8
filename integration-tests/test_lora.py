"""Multi-LoRA on the real default model: adapters of different ranks and targets made with peft,
mixed with base requests in one batch, token for token against transformers + peft."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests
import torch
from openai import OpenAI

from conftest import Server, random_lora

ADAPTERS = {  # name -> (rank, targets, alpha, rslora, std of the random lora_B)
    "upper4": (4, ["q_proj", "v_proj"], 8, False, 1.0),
    "all8": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 16, False, 0.3),
    "mlp16": (16, ["gate_proj", "up_proj", "down_proj"], 32, False, 0.3),
    "attn32": (32, ["k_proj", "o_proj"], 16, True, 0.3),
    "down4": (4, ["down_proj"], 64, False, 0.5),
}
PROMPT = "What is the capital of France?"
LIMITS = ("--max-input-tokens", "256", "--max-total-tokens", "512", "--max-batch-prefill-tokens", "1024")


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    """PEFT directories with random (non-zero) LoRA weights, saved by peft itself."""
    root = tmp_path_factory.mktemp("adapters")
    for i, (name, (r, targets, alpha, rs, std)) in enumerate(ADAPTERS.items()):
        random_lora(model_dir, root / name, r=r, alpha=alpha, targets=targets, std=std, seed=i, rslora=rs)
    return root


@pytest.fixture(scope="module")
def reference(model_dir, adapters, tokenizer, chat):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = tokenizer(chat(PROMPT), return_tensors="pt").input_ids
    out = {}
    for name in [None, *ADAPTERS]:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if name:
            model = PeftModel.from_pretrained(model, adapters / name)
        gen = model.generate(ids, max_new_tokens=32, do_sample=False)
        out[name] = gen[0, ids.shape[1]:].tolist()
    assert all(out[n] != out[None] for n in ADAPTERS), "every adapter changes the output"
    return out


def gen(server, chat, adapter):
    params = {"max_new_tokens": 32, "details": True}
    if adapter:
        params["adapter_id"] = adapter
    r = requests.post(server.url("/generate"), json={"inputs": chat(PROMPT), "parameters": params}, timeout=300)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def test_mixed_adapters_in_one_batch_match_peft(adapters, reference, chat):
    static = ",".join(f"{n}={adapters / n}" for n in ("upper4", "all8"))
    s = Server(*LIMITS, "--lora-adapters", static, "--adapter-source", str(adapters)).wait_ready()
    try:
        names = [None, "upper4", "all8", "mlp16", "attn32"]  # the last two load by name on first use
        with ThreadPoolExecutor(len(names)) as ex:
            got = list(ex.map(lambda n: gen(s, chat, n), names))
        for name, tokens in zip(names, got):
            assert tokens == reference[name], name

        # Listing: the base model, then every adapter usable by name (static and in the source).
        models = requests.get(s.url("/v1/models")).json()["data"]
        assert models[0]["id"] == requests.get(s.url("/info")).json()["model_id"] and "parent" not in models[0]
        assert sorted(m["id"] for m in models[1:]) == sorted(ADAPTERS)
        assert all(m["parent"] == models[0]["id"] for m in models[1:])
        assert sorted(requests.get(s.url("/info")).json()["adapters"]) == sorted(ADAPTERS)

        # OpenAI `model` picks the adapter; the base model answers to its id and to "tessera".
        oai = OpenAI(base_url=s.url("/v1"), api_key="unused", timeout=300)
        text = {n: requests.post(s.url("/generate"), json={"inputs": chat(PROMPT), "parameters": {
            "max_new_tokens": 32, **({"adapter_id": n} if n else {})}}).json()["generated_text"] for n in (None, "mlp16", "down4")}
        c = oai.completions.create(model="mlp16", prompt=chat(PROMPT), max_tokens=32, temperature=0)
        assert c.choices[0].text == text["mlp16"] and c.model == "mlp16"
        c = oai.chat.completions.create(model="down4", messages=[{"role": "user", "content": PROMPT}], max_tokens=32, temperature=0)
        assert c.choices[0].message.content == text["down4"]
        for base in ("tessera", models[0]["id"]):
            c = oai.completions.create(model=base, prompt=chat(PROMPT), max_tokens=32, temperature=0)
            assert c.choices[0].text == text[None]
        for unknown in ("gpt-4o", "org/some-model"):
            with pytest.raises(openai.NotFoundError) as e:
                oai.chat.completions.create(model=unknown, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            err = e.value  # OpenAI's error shape: the SDK shows error.message and reads code and type
            assert err.status_code == 404 and unknown in str(err) and unknown in err.response.json()["error"]["message"]
            assert err.code == "model_not_found" and err.type == "invalid_request_error"
        with pytest.raises(openai.NotFoundError):
            list(oai.completions.create(model="gpt-4o", prompt="hi", max_tokens=2, stream=True))

        # Per-adapter metrics and load counts.
        metrics = requests.get(s.url("/metrics")).text
        assert 'tessera_adapter_requests_total{adapter="mlp16",status="success"}' in metrics
        assert 'tessera_adapter_requests_total{adapter="_base",status="success"}' in metrics
        assert 'tessera_adapter_requests_total{adapter="_unknown",status="adapter_not_found"}' in metrics
        assert "gpt-4o" not in metrics  # client-chosen names never become label values
        assert 'tessera_adapter_generated_tokens_total{adapter="attn32"}' in metrics
        assert 'tessera_adapter_request_duration_seconds_count{adapter="all8"}' in metrics
        loads = [line for line in metrics.splitlines() if line.startswith("tessera_adapter_loads_total")]
        assert loads and float(loads[0].split()[-1]) >= 5
    finally:
        s.stop()


def test_load_and_unload_at_run_time(adapters, reference, chat):
    s = Server(*LIMITS, "--adapter-source", str(adapters), "--api-key", "sesame", "--max-active-adapters", "2").wait_ready()
    auth = {"Authorization": "Bearer sesame"}

    def admin(route, body, headers=auth):
        return requests.post(s.url(route), json=body, headers=headers, timeout=60)

    def generate(adapter):
        return requests.post(s.url("/generate"), headers=auth, timeout=300, json={
            "inputs": chat(PROMPT), "parameters": {"max_new_tokens": 32, "details": True, "adapter_id": adapter}})

    try:
        assert admin("/v1/load_lora_adapter", {"lora_name": "mine", "lora_path": "upper4"}, headers={}).status_code == 401
        r = admin("/v1/load_lora_adapter", {"lora_name": "mine", "lora_path": "upper4"})
        assert r.status_code == 200 and "mine" in r.text
        r = generate("mine")
        assert r.status_code == 200 and [t["id"] for t in r.json()["details"]["tokens"]] == reference["upper4"]
        models = [m["id"] for m in requests.get(s.url("/v1/models"), headers=auth).json()["data"]]
        assert "mine" in models

        # Paths stay inside the adapter source; names stay names; bodies must be well-formed.
        for path in ("../outside", "/etc", str(adapters.parent)):
            r = admin("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path})
            assert r.status_code == 400 and "outside the adapter source" in r.json()["error"], (path, r.text)
        r = admin("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "upper4\u0000/x"})
        assert r.status_code == 400 and "NUL" in r.json()["error"], r.text
        r = admin("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "not-there"})
        assert r.status_code == 404 and r.json()["error_type"] == "not_found"
        r = admin("/v1/load_lora_adapter", {"lora_name": "../x", "lora_path": "upper4"})
        assert r.status_code == 422 and r.json()["error_type"] == "validation"
        r = admin("/v1/load_lora_adapter", {"lora_path": "upper4"})
        assert r.status_code in (400, 422) and "lora_name" in r.json()["error"]
        r = admin("/v1/load_lora_adapter", {"lora_name": "mine", "lora_path": "all8"})
        assert r.status_code == 400 and "already registered" in r.json()["error"]

        # More adapters than --max-active-adapters, all correct; the router evicts idle ones.
        for name in ("all8", "mlp16", "attn32", "mine"):
            r = generate(name)
            assert [t["id"] for t in r.json()["details"]["tokens"]] == reference["upper4" if name == "mine" else name]
        metrics = requests.get(s.url("/metrics"), headers=auth).text
        evictions = [line for line in metrics.splitlines() if line.startswith("tessera_adapter_evictions_total")]
        assert evictions and float(evictions[0].split()[-1]) >= 2

        r = admin("/v1/unload_lora_adapter", {"lora_name": "mine"})
        assert r.status_code == 200 and "mine" in r.text
        r = generate("mine")
        assert r.status_code == 422 and r.json()["error_type"] == "adapter_not_found" and "mine" in r.json()["error"]
        oai = OpenAI(base_url=s.url("/v1"), api_key="sesame", timeout=300)
        with pytest.raises(openai.NotFoundError):
            oai.completions.create(model="mine", prompt="hi", max_tokens=2)
        assert "mine" not in [m["id"] for m in requests.get(s.url("/v1/models"), headers=auth).json()["data"]]
        assert admin("/v1/unload_lora_adapter", {"lora_name": "mine"}).status_code == 404
        assert admin("/v1/unload_lora_adapter", {"lora_name": "mine"}, headers={}).status_code == 401
        assert generate(None).status_code == 200
    finally:
        s.stop()


def test_eviction_keeps_outputs_correct(adapters, reference, chat):
    s = Server(*LIMITS, "--adapter-source", str(adapters), "--max-active-adapters", "2").wait_ready()
    try:
        for _ in range(2):
            for name in ADAPTERS:
                assert gen(s, chat, name) == reference[name], name
        assert "unloaded adapter" in s.log_path.read_text()  # the router made room, idle adapters first
    finally:
        s.stop()


def test_bad_adapters_get_4xx_and_the_server_keeps_serving(adapters, tmp_path, chat, reference):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "src"
    broken.mkdir()

    def copy_of(name, base="upper4"):
        d = broken / name
        d.mkdir()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            (d / f).write_bytes((adapters / base / f).read_bytes())
        return d

    (broken / "garbage").mkdir()
    (broken / "garbage" / "adapter_config.json").write_text("{not json")
    (broken / "garbage" / "adapter_model.safetensors").write_text("nope")
    # A real adapter of another model shape: ranks fine, projections the wrong size.
    wrong = copy_of("wrong")
    t = load_file(str(adapters / "upper4" / "adapter_model.safetensors"))
    save_file({k: torch.zeros(v.shape[0], v.shape[1] + 1) if "lora_A" in k else v for k, v in t.items()},
              str(wrong / "adapter_model.safetensors"))
    nan = copy_of("nan")
    save_file({k: v.clone().fill_(float("nan")) if "lora_B" in k else v for k, v in t.items()}, str(nan / "adapter_model.safetensors"))
    secret = tmp_path / "secret.txt"
    secret.write_text('{"peft_type": "the-secret-is-42"}')
    linked = copy_of("linked")
    (linked / "adapter_config.json").unlink()
    (linked / "adapter_config.json").symlink_to(secret)
    (copy_of("rabc") / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": "abc"}))
    (copy_of("listcfg") / "adapter_config.json").write_text("[1, 2]")
    copy_of("fine")
    s = Server(*LIMITS, "--adapter-source", str(broken)).wait_ready()
    try:
        def post(adapter):
            return requests.post(s.url("/generate"), json={"inputs": "hi", "parameters": {"max_new_tokens": 2, "adapter_id": adapter}})

        r = post("nope")
        assert r.status_code == 422 and "nope" in r.json()["error"] and r.json()["error_type"] == "adapter_not_found"
        r = post("../src/garbage")
        assert r.status_code == 422 and r.json()["error_type"] == "validation"
        for name, why in [("garbage", "not valid JSON"), ("wrong", "shape"), ("nan", "NaN or infinite"),
                          ("linked", "outside the adapter source"), ("rabc", "`r` (the rank) must be an integer"),
                          ("listcfg", "must hold a JSON object")]:
            r = post(name)
            assert r.status_code == 422 and r.json()["error_type"] == "bad_adapter", (name, r.text)
            assert why in r.json()["error"] and "secret" not in r.json()["error"], (name, r.text)
        # Only what can load is offered.
        models = [m["id"] for m in requests.get(s.url("/v1/models")).json()["data"]]
        assert models[1:] == ["fine"], models
        assert requests.get(s.url("/info")).json()["adapters"] == ["fine"]
        assert post("fine").status_code == 200
        assert gen(s, chat, None) == reference[None]
    finally:
        s.stop()


def test_training_example_makes_an_adapter_the_server_serves(tmp_path, model_dir):
    """examples/train_upper_adapter.py at a token size (2 examples, 3 steps): its adapter loads in
    the server and is picked by `model` on the OpenAI route."""
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "upper"
    subprocess.run([sys.executable, str(ROOT / "examples" / "train_upper_adapter.py"), str(out), "--model", str(model_dir),
                    "--examples", "2", "--steps", "3", "--answer-tokens", "4"], check=True, capture_output=True, timeout=600)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    s = Server(*LIMITS, "--lora-adapters", f"upper={out}").wait_ready()
    try:
        r = requests.post(s.url("/v1/chat/completions"), timeout=300, json={
            "model": "upper", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["model"] == "upper", r.text
    finally:
        s.stop()


def test_adapters_never_share_prefix_cache_blocks(adapters, reference, chat):
    """The same prompt on the base model, then on adapters: each starts cold (a hit across them
    would serve keys/values computed with other weights) and hits its own blocks the second time,
    token for token as transformers + peft; mixed in one batch, too."""
    s = Server(*LIMITS, "--adapter-source", str(adapters)).wait_ready()
    try:
        def go(adapter):
            params = {"max_new_tokens": 32, "details": True, **({"adapter_id": adapter} if adapter else {})}
            r = requests.post(s.url("/generate"), json={"inputs": chat(PROMPT), "parameters": params}, timeout=300)
            assert r.status_code == 200, r.text
            d = r.json()["details"]
            return [t["id"] for t in d["tokens"]], d["cached_tokens"]

        assert go(None) == (reference[None], 0)
        base_again = go(None)
        assert base_again[0] == reference[None] and base_again[1] > 0
        for name in ("upper4", "all8"):
            assert go(name) == (reference[name], 0), f"{name} hit blocks written by another model"
            again = go(name)
            assert again[0] == reference[name] and again[1] > 0
        names = [None, "upper4", "all8", "mlp16", None, "upper4"]
        with ThreadPoolExecutor(len(names)) as ex:
            got = list(ex.map(go, names))
        assert [g[0] for g in got] == [reference[n] for n in names]
        assert got[3][1] == 0 and all(c > 0 for (_, c), n in zip(got, names) if n != "mlp16")
    finally:
        s.stop()


@pytest.mark.parametrize("budget, caching", [("64", "on"), ("64", "off"), ("512", "on"), ("4096", "off")])
def test_token_budgets_and_prefix_caching_do_not_change_answers(adapters, reference, chat, budget, caching):
    """Base and adapter requests together, twice (the second round reads the first's cached
    prompts when caching is on), in steps of `budget` tokens: with 64, prompts are chunked beside
    the decoding rows. Every answer is transformers + peft's, token for token."""
    s = Server(*LIMITS, "--max-batch-tokens", budget, "--prefix-caching", caching, "--adapter-source", str(adapters)).wait_ready()
    try:
        names = ["upper4", None, "all8", "mlp16", None, "attn32", "down4"]
        for _ in range(2):
            start = threading.Barrier(len(names))

            def go(n):
                start.wait()
                return gen(s, chat, n)

            with ThreadPoolExecutor(len(names)) as ex:
                assert list(ex.map(go, names)) == [reference[n] for n in names]
        metrics = requests.get(s.url("/metrics"), timeout=10).text
        chunks = sum(float(l.split()[-1]) for l in metrics.splitlines() if l.startswith("tessera_prefill_chunks_total"))
        assert (chunks > 0) == (budget == "64"), chunks
    finally:
        s.stop()


def test_adapters_and_base_under_forced_preemption_match_peft(adapters, reference, chat):
    """A KV cache of 8 blocks (128 tokens) for six requests of ~67 tokens (5 blocks each): any two
    running together outgrow it, so the youngest are preempted and recomputed (with their adapter,
    their cached blocks reused) in chunks of steps of 24 tokens, and every answer is still
    transformers + peft's, token for token."""
    s = Server("--max-input-tokens", "60", "--max-total-tokens", "100", "--max-batch-prefill-tokens", "60",
               "--max-batch-tokens", "24", "--max-batch-total-tokens", "128", "--adapter-source", str(adapters)).wait_ready()
    try:
        names = ["upper4", None, "all8", "mlp16", None, "attn32"]
        for n in set(names) - {None}:  # resident first, so that all six reach the queue together
            r = requests.post(s.url("/generate"), timeout=300,
                              json={"inputs": "Hi", "parameters": {"max_new_tokens": 1, "adapter_id": n}})
            assert r.status_code == 200, r.text
        start = threading.Barrier(len(names))

        def go(n):
            start.wait()
            return gen(s, chat, n)

        with ThreadPoolExecutor(len(names)) as ex:
            got = list(ex.map(go, names))
        assert got == [reference[n] for n in names]
        metrics = requests.get(s.url("/metrics"), timeout=10).text
        assert sum(float(l.split()[-1]) for l in metrics.splitlines() if l.startswith("tessera_preemptions_total")) > 0
        assert sum(float(l.split()[-1]) for l in metrics.splitlines() if l.startswith("tessera_prefill_chunks_total")) > 0
    finally:
        s.stop()
