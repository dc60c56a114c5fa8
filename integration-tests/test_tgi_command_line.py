"""A TGI user's command line: TGI's flag names work where the feature exists here, and flags for
features Tessera does not have are refused at start with a message naming them (not clap's
"unexpected argument")."""

from __future__ import annotations

import pytest
import requests

from conftest import Server


KEY = {"Authorization": "Bearer sesame"}
ORIGIN = "https://museum.example"
TEMPLATE = "Q: {{ messages[-1]['content'] }}\nA:"


@pytest.fixture(scope="module")
def tgi_style():
    """Started as a TGI user would, with TGI's flag names."""
    s = Server("--served-model-name", "museum-guide", "--cors-allow-origin", f"{ORIGIN},https://other.example",
               "--api-key", "sesame", "--max-batch-prefill-tokens", "2048", "--chat-template", TEMPLATE,
               "--sharded", "false").wait_ready()
    yield s
    s.stop()


def test_served_model_name_is_the_name_clients_see(tgi_style):
    s = tgi_style
    assert requests.get(s.url("/info"), headers=KEY, timeout=10).json()["model_id"] == "museum-guide"
    models = requests.get(s.url("/v1/models"), headers=KEY, timeout=10).json()["data"]
    assert models[0]["id"] == "museum-guide"
    r = requests.post(s.url("/v1/chat/completions"), headers=KEY, timeout=120,
                      json={"model": "museum-guide", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "museum-guide"


def test_cors_lets_the_listed_origins_call_from_a_browser(tgi_style, server):
    s = tgi_style
    pre = requests.options(s.url("/generate"), timeout=10, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type,authorization"})
    assert pre.status_code == 200, pre.text  # answered before the API key guard
    assert pre.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
    r = requests.post(s.url("/generate"), json=body, headers={**KEY, "Origin": ORIGIN}, timeout=60)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    other = requests.post(s.url("/generate"), json=body, headers={**KEY, "Origin": "https://evil.example"}, timeout=60)
    assert "access-control-allow-origin" not in other.headers
    # without --cors-allow-origin, no CORS headers at all
    plain = requests.post(server.url("/generate"), json=body, headers={"Origin": ORIGIN}, timeout=60)
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers


def test_chat_template_replaces_the_models_own(tgi_style):
    s = tgi_style
    r = requests.post(s.url("/v1/chat/completions"), headers=KEY, timeout=120,
                      json={"messages": [{"role": "user", "content": "Where are the owls?"}], "max_tokens": 2})
    assert r.status_code == 200, r.text
    ids = requests.post(s.url("/tokenize"), headers=KEY, timeout=10, json={"inputs": "Q: Where are the owls?\nA:"}).json()
    assert r.json()["usage"]["prompt_tokens"] == len(ids)


def test_flags_for_missing_features_are_refused_by_name():
    s = Server("--quantize", "awq", "--trust-remote-code")
    rc = s.proc.wait(60)
    s.stop()
    log = s.tail()
    assert rc != 0
    assert "not supported by Tessera: --quantize awq" in log and "--trust-remote-code" in log, log
    assert "unexpected argument" not in log


def test_a_flag_set_through_its_environment_variable_is_refused_too():
    s = Server(env={"SPECULATE": "2"})
    rc = s.proc.wait(60)
    s.stop()
    assert rc != 0 and "--speculate 2" in s.tail()


def test_sharded_without_gpus_is_refused_with_the_reason():
    s = Server("--sharded", "true", env={"CUDA_VISIBLE_DEVICES": ""})
    rc = s.proc.wait(60)
    s.stop()
    assert rc != 0 and "--sharded true without --num-shard needs at least 2 visible GPUs; 0 found" in s.tail()


def test_the_launcher_and_the_shard_default_the_flags_they_share_alike():
    """The launcher passes these to every shard explicitly; a shard started by hand (benchmarks,
    debugging) must behave the same, so the two defaults must not drift apart."""
    import re
    import subprocess

    from conftest import LAUNCHER
    from text_generation_server.cli import parser

    help_text = subprocess.run([str(LAUNCHER), "--help"], capture_output=True, text=True, check=True).stdout
    shard = parser().parse_args(["serve"])
    shared = {"--cuda-graphs": shard.cuda_graphs, "--cuda-memory-fraction": shard.cuda_memory_fraction,
              "--max-active-adapters": shard.max_active_adapters, "--max-lora-rank": shard.max_lora_rank,
              "--shard-uds-path": shard.uds_path, "--otlp-service-name": shard.otlp_service_name}
    for flag, want in shared.items():
        m = re.search(rf"{flag} <\w+>.*?\[default: ([^\]]+)\]", help_text, re.S)
        assert m, flag
        assert type(want)(m.group(1)) == want, (flag, m.group(1), want)
