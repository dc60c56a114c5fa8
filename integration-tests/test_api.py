"""The whole HTTP API with unchanged PyPI clients (text-generation, openai) and raw requests."""

from __future__ import annotations

import json

import openai
import pytest
import requests
from openai import OpenAI
from text_generation import Client

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def tgi(server):
    return Client(server.base, timeout=300)


@pytest.fixture(scope="module")
def oai(server):
    return OpenAI(base_url=server.url("/v1"), api_key="unused", timeout=300)


def test_tgi_client_generate_with_everything(tgi, chat, tokenizer):
    prompt = chat(QUESTION)
    r = tgi.generate(prompt, max_new_tokens=12, decoder_input_details=True, top_n_tokens=3)
    assert "Paris" in r.generated_text
    n_prompt = len(tokenizer(prompt).input_ids)
    assert len(r.details.prefill) == n_prompt
    assert r.details.prefill[0].logprob is None
    assert all(t.logprob is not None and t.logprob <= 0 for t in r.details.prefill[1:])
    assert len(r.details.top_tokens) == r.details.generated_tokens
    assert all(len(alts) == 3 for alts in r.details.top_tokens)
    # Greedy: the chosen token is the most likely alternative.
    assert [alts[0].id for alts in r.details.top_tokens] == [t.id for t in r.details.tokens]


def test_tgi_client_best_of(tgi, chat):
    r = tgi.generate(chat("Name a fruit."), max_new_tokens=8, best_of=2, do_sample=True)
    assert len(r.details.best_of_sequences) == 1
    other = r.details.best_of_sequences[0]
    best_lp = sum(t.logprob for t in r.details.tokens)
    assert best_lp >= sum(t.logprob for t in other.tokens)


def test_tgi_client_stream_with_details(tgi, chat):
    events = list(tgi.generate_stream(chat(QUESTION), max_new_tokens=12, top_n_tokens=2))
    assert events[-1].details is not None and events[-1].generated_text
    assert events[-1].details.generated_tokens == len(events)
    assert all(len(e.top_tokens) == 2 for e in events)
    assert "Paris" in events[-1].generated_text


def test_root_route_dispatches_on_stream(server, chat):
    body = {"inputs": chat(QUESTION), "parameters": {"max_new_tokens": 5}}
    r = requests.post(server.url("/"), json=body)
    assert r.status_code == 200 and isinstance(r.json(), list)
    r = requests.post(server.url("/"), json={**body, "stream": True}, stream=True)
    assert r.headers["content-type"].startswith("text/event-stream")
    assert sum(1 for line in r.iter_lines() if line.startswith(b"data:")) == 5


def test_return_full_text(server):
    r = requests.post(server.url("/generate"), json={"inputs": "Hello there", "parameters": {"max_new_tokens": 3, "return_full_text": True}})
    assert r.json()["generated_text"].startswith("Hello there")


def test_tokenize(server, tokenizer):
    r = requests.post(server.url("/tokenize"), json={"inputs": "Hello world, again"})
    toks = r.json()
    assert [t["id"] for t in toks] == tokenizer("Hello world, again").input_ids
    assert "".join(t["text"] for t in toks) == "Hello world, again"


def test_openai_chat(oai):
    r = oai.chat.completions.create(model="tessera", messages=[{"role": "user", "content": QUESTION}], max_tokens=20,
                                    temperature=0, logprobs=True, top_logprobs=2)
    c = r.choices[0]
    assert "Paris" in c.message.content and c.message.role == "assistant"
    assert c.finish_reason == "stop"
    assert "<|im_end|>" not in c.message.content
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert len(c.logprobs.content) > 0 and all(len(t.top_logprobs) == 2 for t in c.logprobs.content)


def test_openai_chat_stream_with_usage(oai):
    chunks = list(oai.chat.completions.create(model="tessera", messages=[{"role": "user", "content": QUESTION}],
                                              max_tokens=20, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert "Paris" in text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_openai_chat_stop_is_cut(oai):
    r = oai.chat.completions.create(model="tessera", messages=[{"role": "user", "content": QUESTION}], max_tokens=20,
                                    temperature=0, stop=[" Paris"])
    assert r.choices[0].finish_reason == "stop"
    assert "Paris" not in r.choices[0].message.content and r.choices[0].message.content


def test_openai_completions_n_and_logprobs(oai):
    r = oai.completions.create(model="tessera", prompt="The capital of France is", max_tokens=6, temperature=0.8,
                               seed=3, n=2, logprobs=2)
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert len(c.logprobs.tokens) == 6 and len(c.logprobs.top_logprobs[0]) <= 2
        assert "".join(c.logprobs.tokens) == c.text
    assert r.usage.completion_tokens == 12


def test_openai_completions_stream(oai):
    chunks = list(oai.completions.create(model="tessera", prompt="The capital of France is", max_tokens=6, temperature=0,
                                         stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks).startswith(" Paris")


def test_openai_models(oai, server):
    ids = [m.id for m in oai.models.list()]
    assert ids == [requests.get(server.url("/info")).json()["model_id"]]


def test_openai_errors_are_json_in_openais_shape(server, oai):
    r = requests.post(server.url("/v1/chat/completions"), json={"messages": [], "max_tokens": 3})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "validation" and err["type"] == "invalid_request_error" and "empty" in err["message"]
    assert err["param"] == "messages"  # OpenAI's name of the field at fault
    r = requests.post(server.url("/v1/completions"), json={"prompt": "x", "temperature": 3})
    assert r.status_code == 422 and "between 0 and 2, got 3" in r.json()["error"]["message"]
    r = requests.post(server.url("/v1/completions"), data="{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed"
    # The openai client shows the message (it reads only error.message).
    with pytest.raises(openai.UnprocessableEntityError, match="cannot be empty") as e:
        oai.chat.completions.create(model="tessera", messages=[], max_tokens=3)
    assert e.value.code == "validation"
    # TGI's routes keep TGI's flat body.
    r = requests.post(server.url("/generate"), json={"inputs": "x", "parameters": {"top_p": 5}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation" and isinstance(r.json()["error"], str)
    assert set(r.json()) == {"error", "error_type"}


def test_openapi_document_describes_every_route(server):
    doc = requests.get(server.url("/api-doc/openapi.json")).json()
    for path in ["/", "/generate", "/generate_stream", "/tokenize", "/health", "/info", "/metrics", "/v1/completions",
                 "/v1/chat/completions", "/v1/models"]:
        assert path in doc["paths"], path
    assert "422" in doc["paths"]["/generate"]["post"]["responses"]
    assert "429" in doc["paths"]["/generate"]["post"]["responses"]


def test_metrics_move_with_requests(server, chat):
    def scrape() -> dict[str, float]:
        out = {}
        for line in requests.get(server.url("/metrics")).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    before = scrape()
    requests.post(server.url("/generate"), json={"inputs": chat(QUESTION), "parameters": {"max_new_tokens": 4}})
    after = scrape()
    for name in ["tessera_queue_size", "tessera_batch_size", "tessera_kv_blocks_free", "tessera_kv_blocks_total"]:
        assert name in after, name
    moved = ["tessera_request_duration_seconds_count", "tessera_request_queue_duration_seconds_count",
             "tessera_batch_prefill_duration_seconds_count", "tessera_batch_decode_duration_seconds_count",
             "tessera_batch_router_duration_seconds_count", "tessera_batch_prefill_tokens_count",
             "tessera_time_to_first_token_seconds_count", "tessera_inter_token_latency_seconds_count",
             "tessera_request_input_tokens_count", "tessera_request_generated_tokens_count",
             "tessera_input_tokens_total", "tessera_generated_tokens_total", 'tessera_requests_total{status="success"}']
    for name in moved:
        assert after.get(name, 0) > before.get(name, 0), name
    requests.post(server.url("/generate"), json={"inputs": "hi", "parameters": {"top_p": 5}})
    assert scrape().get('tessera_requests_total{status="validation"}', 0) >= 1


def test_stream_error_event_shape(server):
    # Errors before the stream starts are plain JSON with a status.
    r = requests.post(server.url("/generate_stream"), json={"inputs": "x", "parameters": {"best_of": 2, "do_sample": True}})
    assert r.status_code == 422 and "stream" in r.json()["error"]
