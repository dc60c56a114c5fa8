"""Structured output on the default model: JSON schemas, regexes and tool calls through every
route and client (TGI `grammar`, OpenAI `response_format` and `tools`, huggingface_hub's
InferenceClient, streaming), refusals, and constrained requests batched with unconstrained ones
(and adapters) leaving the unconstrained answers unchanged."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
import requests

from conftest import Server, random_lora

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                    "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                   "required": ["name", "age"], "additionalProperties": False}},
        "required": ["person"], "additionalProperties": False},
    "array_enum": {"type": "object", "properties": {
        "colors": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]},
                   "minItems": 1, "maxItems": 3}},
        "required": ["colors"], "additionalProperties": False},
    "numbers": {"type": "object", "properties": {
        "temperature": {"type": "number", "minimum": -50, "maximum": 50},
        "count": {"type": "integer", "exclusiveMinimum": 0, "maximum": 9}},
        "required": ["temperature", "count"], "additionalProperties": False},
    "optional": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 30}, "done": {"type": "boolean"}, "note": {"type": "string", "maxLength": 10}},
        "required": ["title", "done"], "additionalProperties": False},
    "ref": {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                                "required": ["x", "y"], "additionalProperties": False}},
            "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
            "required": ["start", "end"], "additionalProperties": False},
}
ASK = "Answer in JSON: describe something for the schema."


def chat_prompt(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_generate_with_a_json_schema_always_validates(server, tokenizer, name):
    schema = SCHEMAS[name]
    r = requests.post(server.url("/generate"), json={"inputs": chat_prompt(tokenizer, ASK), "parameters": {
        "max_new_tokens": 120, "grammar": {"type": "json", "value": schema}, "details": True}}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["details"]["finish_reason"] == "eos_token", body
    jsonschema.validate(json.loads(body["generated_text"]), schema)


@pytest.mark.parametrize("name", ["nested", "ref"])
def test_sampled_and_streamed_answers_validate_too(server, tokenizer, name):
    schema = SCHEMAS[name]
    for seed in range(3):
        body = {"inputs": chat_prompt(tokenizer, ASK), "parameters": {
            "max_new_tokens": 120, "do_sample": True, "temperature": 1.2, "seed": seed,
            "grammar": {"type": "json_object", "value": schema}}}
        with requests.post(server.url("/generate_stream"), json=body, stream=True, timeout=120) as r:
            assert r.status_code == 200
            events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith(b"data:")]
        text = "".join(e["token"]["text"] for e in events if not e["token"]["special"])
        assert events[-1]["generated_text"] == text
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("pattern", [r"[0-9]{4}-[0-9]{2}-[0-9]{2}", r"(yes|no)", r"[A-Z][a-z]{2,8}( [A-Z][a-z]{2,8})?",
                                     r"#[0-9a-f]{6}"])
def test_regex_answers_always_match(server, tokenizer, pattern):
    for seed in range(3):
        r = requests.post(server.url("/generate"), json={"inputs": chat_prompt(tokenizer, "Say something."), "parameters": {
            "max_new_tokens": 30, "do_sample": True, "seed": seed, "grammar": {"type": "regex", "value": pattern}}},
                          timeout=60)
        assert r.status_code == 200, r.text
        assert re.fullmatch(pattern, r.json()["generated_text"]), r.json()


def test_openai_response_formats(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url("/v1"), api_key="-")
    msgs = [{"role": "user", "content": ASK}]
    schema = SCHEMAS["array_enum"]
    r = client.chat.completions.create(model="tgi", messages=msgs, max_tokens=80, n=2, temperature=1.0, response_format={
        "type": "json_schema", "json_schema": {"name": "colors", "schema": schema, "strict": True}})
    assert len(r.choices) == 2
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), schema)
    r = client.chat.completions.create(model="tgi", messages=msgs, max_tokens=200, response_format={"type": "json_object"})
    content = r.choices[0].message.content
    if r.choices[0].finish_reason == "stop":  # any object: it may also run past max_tokens
        assert isinstance(json.loads(content), dict)
    else:
        assert r.choices[0].finish_reason == "length" and content.lstrip().startswith("{")
    stream = client.chat.completions.create(model="tgi", messages=msgs, max_tokens=80, stream=True, response_format={
        "type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMAS["numbers"]}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMAS["numbers"])
    r = client.completions.create(model="tgi", prompt="A JSON object:", max_tokens=100, seed=3, extra_body={
        "response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": SCHEMAS["optional"]}}})
    if r.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS["optional"])
    else:  # sampled: the grammar allows whitespace between tokens, where a small model may linger
        assert r.choices[0].finish_reason == "length" and r.choices[0].text.lstrip().startswith("{")


def test_tgi_client(server, tokenizer):
    from text_generation import Client
    from text_generation.types import Grammar, GrammarType

    client = Client(server.base, timeout=60)
    schema = SCHEMAS["numbers"]
    r = client.generate(chat_prompt(tokenizer, ASK), max_new_tokens=60, grammar=Grammar(type=GrammarType.Json, value=schema))
    jsonschema.validate(json.loads(r.generated_text), schema)
    r = client.generate("The year is", max_new_tokens=10, grammar=Grammar(type=GrammarType.Regex, value="[0-9]{4}"))
    assert re.fullmatch("[0-9]{4}", r.generated_text)


def test_huggingface_hub_inference_client(server):
    from huggingface_hub import InferenceClient

    schema = SCHEMAS["nested"]
    out = InferenceClient(base_url=server.base).chat_completion(
        [{"role": "user", "content": ASK}], max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
                                      "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 20}},
                                                     "required": ["tz"]}}}]


def test_a_named_tool_choice_always_yields_a_valid_call(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url("/v1"), api_key="-")
    msgs = [{"role": "user", "content": "What's the weather like in Paris?"}]
    for seed in range(3):
        r = client.chat.completions.create(model="tgi", messages=msgs, tools=WEATHER, max_tokens=80, seed=seed,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER[0]["function"]["parameters"])
    # required: one of the tools; streamed: the call arrives as delta.tool_calls
    stream = client.chat.completions.create(model="tgi", messages=msgs, tools=WEATHER, tool_choice="required",
                                            max_tokens=80, stream=True)
    calls, finish = [], None
    for c in stream:
        for ch in c.choices:
            calls += ch.delta.tool_calls or []
            finish = ch.finish_reason or finish
    assert finish == "tool_calls" and calls and calls[0].function.name in ("get_weather", "get_time")
    tool = next(t for t in WEATHER if t["function"]["name"] == calls[0].function.name)
    jsonschema.validate(json.loads(calls[0].function.arguments), tool["function"]["parameters"])
    # the conversation goes on with the tool's answer
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    r = client.chat.completions.create(model="tgi", max_tokens=20, messages=msgs + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}])
    assert r.choices[0].message.content


def test_auto_tool_choice_answers_a_call_or_text(server):
    r = requests.post(server.url("/v1/chat/completions"), json={
        "messages": [{"role": "user", "content": "Hello!"}], "tools": WEATHER, "max_tokens": 80}, timeout=60)
    assert r.status_code == 200, r.text
    msg = r.json()["choices"][0]
    if msg["finish_reason"] == "tool_calls":
        assert msg["message"]["tool_calls"][0]["function"]["name"] in ("get_weather", "get_time")
    else:  # no_tool's text, whole or cut by max_tokens
        assert msg["finish_reason"] in ("stop", "length") and isinstance(msg["message"]["content"], str)


@pytest.mark.parametrize("route, body, param, message", [
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "a("}}}, "grammar", "invalid regex"),
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "json", "value": {"type": "nonsense"}}}}, "grammar", "invalid `grammar`"),
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "xml", "value": "<a/>"}}}, "grammar", "unknown type"),
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "json", "value": 3}}}, "grammar", "must be a JSON schema"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}},
     "response_format", "json_schema.schema"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}}},
     "response_format", "strin"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": WEATHER,
                              "response_format": {"type": "json_object"}}, "response_format", "cannot be used together"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": WEATHER,
                              "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not in `tools`"),
])
def test_bad_grammars_are_refused_before_queueing(server, route, body, param, message):
    r = requests.post(server.url(route), json=body, timeout=30)
    assert r.status_code == 422, r.text
    err = r.json()
    found = err["error"] if route.startswith("/v1") else err
    text = found["message"] if route.startswith("/v1") else found["error"]
    assert found["param"] == param and message in text, err


def test_a_grammar_that_cannot_finish_ends_by_length(server):
    r = requests.post(server.url("/generate"), json={"inputs": "x", "parameters": {
        "max_new_tokens": 4, "details": True, "grammar": {"type": "regex", "value": "(ab){20}"}}}, timeout=30)
    assert r.status_code == 200
    d = r.json()
    assert d["details"]["finish_reason"] == "length" and d["generated_text"] and "abab".startswith(d["generated_text"][:4])


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, model_dir):
    return random_lora(model_dir, tmp_path_factory.mktemp("so-adapter") / "a", targets=["q_proj", "v_proj", "down_proj"], seed=3)


def test_constrained_rows_leave_the_others_unchanged(adapter, tokenizer):
    """Greedy unconstrained requests (base and adapter) answer the same alone as beside
    constrained ones (schemas, regexes, with and without the adapter) in the same batches."""
    s = Server("--lora-adapters", f"a={adapter}", "--max-input-tokens", "256", "--max-total-tokens", "512").wait_ready()
    try:
        free = [{"inputs": chat_prompt(tokenizer, q), "parameters": {"max_new_tokens": 24, "details": True, **extra}}
                for q, extra in [("What is the capital of France?", {}), ("Name a fruit.", {"adapter_id": "a"}),
                                 ("Count to five.", {}), ("Tell me a joke.", {"adapter_id": "a"})]]
        bound = [{"inputs": chat_prompt(tokenizer, ASK), "parameters": {"max_new_tokens": 40, "grammar": g, **extra}}
                 for g, extra in [({"type": "json", "value": SCHEMAS["nested"]}, {}),
                                  ({"type": "regex", "value": "[a-z]{3,20}"}, {"adapter_id": "a"}),
                                  ({"type": "json", "value": SCHEMAS["array_enum"]}, {"adapter_id": "a"})]]

        def ask(body):
            r = requests.post(s.url("/generate"), json=body, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()

        alone = [[t["id"] for t in ask(b)["details"]["tokens"]] for b in free]
        with ThreadPoolExecutor(len(free) + len(bound)) as pool:
            futures = [pool.submit(ask, b) for b in bound + free + bound]
            answers = [f.result() for f in futures]
        together = [[t["id"] for t in a["details"]["tokens"]] for a in answers[len(bound):len(bound) + len(free)]]
        assert together == alone
        jsonschema.validate(json.loads(answers[0]["generated_text"]), SCHEMAS["nested"])
        assert re.fullmatch("[a-z]{3,20}", answers[1]["generated_text"])
        metrics = requests.get(s.url("/metrics"), timeout=10).text
        assert re.search(r'tessera_grammar_cache_total\{result="hit"\} [1-9]', metrics), "the repeated grammars were cached"
        assert "tessera_grammar_mask_seconds_count" in metrics and "tessera_grammar_compile_seconds_count" in metrics
    finally:
        s.stop()


def test_grammars_with_chunked_prompts_stop_sequences_and_preemption(tokenizer):
    """Long prompts computed in 12-token chunks beside constrained rows, on a KV cache small
    enough to preempt: every constrained answer still follows its grammar; a stop sequence ends a
    constrained answer like any other."""
    s = Server("--max-batch-tokens", "16", "--max-batch-prefill-tokens", "12", "--max-input-tokens", "256",
               "--max-total-tokens", "384", "--max-batch-total-tokens", "1024").wait_ready()
    try:
        long_ask = "Please describe, in JSON, a person. " * 12 + ASK
        bodies = [{"inputs": chat_prompt(tokenizer, long_ask), "parameters": {
            "max_new_tokens": 120, "do_sample": True, "seed": i, "grammar": {"type": "json", "value": SCHEMAS["nested"]}}}
            for i in range(6)]

        def ask(body):
            r = requests.post(s.url("/generate"), json=body, timeout=300)
            assert r.status_code == 200, r.text
            return r.json()["generated_text"]

        with ThreadPoolExecutor(len(bodies)) as pool:
            for text in pool.map(ask, bodies):
                jsonschema.validate(json.loads(text), SCHEMAS["nested"])
        metrics = requests.get(s.url("/metrics"), timeout=10).text
        assert re.search(r"tessera_chunked_prefills_total [1-9]", metrics), "the prompts were chunked"
        r = requests.post(s.url("/generate"), json={"inputs": "Say hello", "parameters": {
            "max_new_tokens": 30, "stop": ["l"], "details": True, "grammar": {"type": "regex", "value": "hel+o world"}}},
                          timeout=60)
        assert r.status_code == 200, r.text
        # the text runs to the end of the token that completed the stop sequence, as in TGI
        assert r.json()["details"]["finish_reason"] == "stop_sequence" and r.json()["generated_text"].startswith("hel")
    finally:
        s.stop()
