"""The server as an operator and an attacker probe it: protocol errors, refusals, client quirks,
overload, slow clients, a frozen shard, two instances on one host, signals, operator messages.
One test (or group) per defect of the hardening issue, on the real launcher and default model."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
from openai import OpenAI

from conftest import LAUNCHER, ROOT, BackgroundStream, Server, free_port

SMALL = ("--max-input-tokens", "256", "--max-total-tokens", "512", "--max-batch-prefill-tokens", "512")
# Greedy decoding keeps counting for a long time: a request that is still running seconds later.
COUNTING = "Count from 1 to 1000: 1, 2, 3, 4,"


def post(server, path, body, **kw):
    return requests.post(server.url(path), json=body, timeout=kw.pop("timeout", 120), **kw)


def raw_http(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Sends `data` on a fresh connection; returns everything until the server closes or `timeout`."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return out


# ---- 7. every status has a JSON body -------------------------------------------------------------


def test_protocol_errors_have_json_bodies(server):
    r = requests.get(server.url("/generate"))
    assert r.status_code == 405 and r.json()["error_type"] == "method_not_allowed", r.text
    r = requests.post(server.url("/health"))
    assert r.status_code == 405 and r.json()["error_type"] == "method_not_allowed"
    r = requests.get(server.url("/v1/completions"))  # OpenAI routes: OpenAI's shape
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = requests.get(server.url("/info?" + "a" * 70000))
    assert r.status_code == 414 and r.json()["error_type"] == "uri_too_long", r.text
    r = requests.get(server.url("/info"), headers={f"x-h{i}": "v" for i in range(120)})
    assert r.status_code == 431 and r.json()["error_type"] == "headers_too_large", r.text
    out = raw_http(server.port, b"NOT HTTP AT ALL\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and json.loads(body)["error_type"] == "malformed", out


def test_openai_errors_name_openai_parameters(server):
    oai = OpenAI(base_url=server.url("/v1"), api_key="-", max_retries=0)
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        (dict(n=0), "n", "`n` must be between 1 and"),
        (dict(max_tokens=0), "max_tokens", "`max_tokens` must be at least 1"),
        (dict(logprobs=True, top_logprobs=9), "top_logprobs", "`top_logprobs` must be between 0 and 5"),
        (dict(max_tokens=2047), "max_tokens", "prompt tokens + `max_tokens` must be <="),
    ]
    for kwargs, param, text in cases:
        with pytest.raises(openai.UnprocessableEntityError) as e:
            oai.chat.completions.create(model="tessera", messages=msgs, **kwargs)
        err = e.value.response.json()["error"]
        assert err["param"] == param and text in err["message"], err
        for tgi_name in ("best_of", "max_new_tokens", "top_n_tokens", "`inputs`"):
            assert tgi_name not in err["message"], err
    with pytest.raises(openai.UnprocessableEntityError) as e:
        oai.completions.create(model="tessera", prompt="word " * 2000, max_tokens=2)
    err = e.value.response.json()["error"]
    assert err["param"] == "prompt" and "the prompt has" in err["message"], err
    with pytest.raises(openai.UnprocessableEntityError) as e:
        oai.completions.create(model="tessera", prompt="hi", max_tokens=2, logprobs=9)
    assert e.value.response.json()["error"]["param"] == "logprobs"


# ---- 8. what is not supported is refused, never ignored -------------------------------------------


CHAT = {"model": "tessera", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("extra, named", [
    # tools and response_format are supported (test_structured_output.py); malformed ones are refused
    ({"tools": [{"type": "function", "function": {"name": "f g", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"logit_bias": {"42": 100}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]}]}, "image_url"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "tool_calls"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "wizard"),
    ({"messages": [{"role": "user", "content": None}]}, "cannot be null"),
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "name"),
    ({"min_p": 0.1}, "min_p"),
])
def test_unsupported_chat_inputs_are_refused(server, extra, named):
    r = post(server, "/v1/chat/completions", {**CHAT, **extra})
    assert r.status_code == 422, r.text
    assert named in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("route, body, named", [
    ("/v1/completions", {"prompt": "hi", "suffix": "the end"}, "suffix"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"42": 1}}, "logit_bias"),
    ("/generate", {"inputs": "hi", "parameters": {"grammar": {"type": "xml", "value": "<a/>"}}}, "grammar"),
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 2, "min_tokens": 5}}, "min_tokens"),
    ("/generate_stream", {"inputs": "hi", "extra": True}, "extra"),
])
def test_unsupported_fields_are_refused(server, route, body, named):
    r = post(server, route, body)
    assert r.status_code == 422, r.text
    assert named in r.text


def test_fields_that_say_nothing_are_accepted(server):
    r = post(server, "/v1/chat/completions", {**CHAT, "tools": None, "tool_choice": "none", "logit_bias": {},
                                              "response_format": {"type": "text"}, "functions": []})
    assert r.status_code == 200, r.text
    r = post(server, "/v1/chat/completions", {**CHAT, "messages": [
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    assert r.status_code == 200, r.text


# ---- 9. client compatibility -----------------------------------------------------------------------


def test_nulls_read_as_absent(server):
    r = post(server, "/generate", {"inputs": "hi", "stream": None, "parameters": {
        "max_new_tokens": 2, "details": None, "decoder_input_details": None, "stop": None, "watermark": None,
        "grammar": None, "top_n_tokens": None}})
    assert r.status_code == 200, r.text
    r = post(server, "/v1/chat/completions", {**CHAT, "logprobs": None, "stream": None, "stream_options": None, "n": None})
    assert r.status_code == 200, r.text


def test_tgi_and_hub_clients_chat(server):
    from huggingface_hub import InferenceClient
    from text_generation import Client
    from text_generation.types import Message

    r = Client(server.base, timeout=120).chat(messages=[Message(role="user", content="Say hi")], max_tokens=3)
    assert r.choices[0].message.content  # it sends "logprobs": null, "tools": null, ...
    r = InferenceClient(server.base, timeout=120).chat_completion([{"role": "user", "content": "Say hi"}], max_tokens=3)
    assert r.choices[0].message.content  # it sends "model": "dummy"


def test_completion_usage_counts_each_prompt_once(server, tokenizer):
    prompts = ["The capital of France is", "Hi"]
    r = post(server, "/v1/completions", {"prompt": prompts, "max_tokens": 3, "n": 2, "temperature": 0.7, "seed": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["choices"]) == 4
    assert body["usage"]["prompt_tokens"] == sum(len(tokenizer(p).input_ids) for p in prompts)
    assert body["usage"]["completion_tokens"] == 12


# ---- 10. bounded metric labels -----------------------------------------------------------------------


def test_client_chosen_model_names_never_become_labels(server):
    names = [f"no-such-model-{i}-{os.getpid()}" for i in range(3)]
    for name in names:
        r = post(server, "/v1/completions", {"model": name, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = post(server, "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 2, "adapter_id": name}})
        assert r.status_code == 422 and r.json()["error_type"] == "adapter_not_found"
    metrics = requests.get(server.url("/metrics")).text
    assert not any(n in metrics for n in names)
    assert 'tessera_adapter_requests_total{adapter="_unknown",status="adapter_not_found"}' in metrics
    assert "tessera_adapter_load_failures_total" not in metrics  # nothing was loaded, nothing failed


# ---- 12. one log line per request ---------------------------------------------------------------------


def test_each_finished_request_is_logged(server):
    r = post(server, "/generate", {"inputs": "Log me", "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200
    time.sleep(0.5)
    lines = [l for l in server.log_path.read_text().splitlines() if "tessera::request" in l and "input_tokens=2 " in l]
    assert lines, server.tail()
    line = lines[-1]
    for field in ("id=", 'adapter="-"', "output_tokens=3", "queue_ms=", "ttft_ms=", "total_ms=", 'outcome="length"'):
        assert field in line, line


def test_operator_messages(tmp_path):
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}

    def launch(*args):
        return subprocess.run([str(LAUNCHER), "--port", str(free_port()), "--shard-uds-path", str(tmp_path / "s"), *args],
                              capture_output=True, text=True, timeout=300, env=env)

    r = launch("--model-id", str(tmp_path / "no-model-here"))
    assert r.returncode == 1 and "is neither a local directory nor a hub repository id" in r.stderr, r.stderr
    r = launch("--server-bin", "no-such-tessera-server")
    assert r.returncode == 1 and "`no-such-tessera-server` was not found" in r.stderr, r.stderr
    r = launch("--dtype", "float8")  # the shard refuses it: at ERROR, and in the launcher's last word
    assert r.returncode == 1
    assert re.search(r"ERROR tessera::shard: .*--dtype must be one of", r.stderr), r.stderr
    assert "shard-0 exited (exit status: 1); its last lines" in r.stderr, r.stderr


# ---- 4, 7, 11, 3: overload, slow clients, drain on Ctrl-C -------------------------------------------------


@pytest.fixture(scope="module")
def tight():
    s = Server(*SMALL, "--max-concurrent-requests", "2", "--shutdown-timeout", "3", "--http-header-timeout", "2",
               "--http-body-timeout", "2", "--disable-request-logging", new_session=True).wait_ready()
    yield s
    s.stop()


def test_over_the_limit_costs_no_tokenization(tight):
    big = "word " * 380_000  # 1.9 MB
    r = post(tight, "/generate", {"inputs": big, "parameters": {"max_new_tokens": 1}})
    assert r.status_code == 422 and "bytes long" in r.json()["error"], r.text  # refused untokenized

    def one(_):  # `truncate` makes the router tokenize the whole prompt (a second or more each)
        return post(tight, "/generate", {"inputs": big, "parameters": {"max_new_tokens": 1, "truncate": 16}})

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(one, range(8)))
    over = [r for r in results if r.status_code == 429]
    assert len(over) >= 4, [r.status_code for r in results]  # the permit comes before the tokenizer
    assert all(r.status_code == 200 for r in results if r.status_code != 429)
    for r in over:
        assert r.json()["error_type"] == "overloaded" and r.headers["retry-after"] == "1"
    with ThreadPoolExecutor(8) as ex:  # /tokenize tokenizes too: the same limit
        results = list(ex.map(lambda _: post(tight, "/tokenize", {"inputs": big}), range(8)))
    assert sum(r.status_code == 429 for r in results) >= 4, [r.status_code for r in results]
    assert all(r.status_code in (200, 429) for r in results)
    assert "tessera::request" not in tight.log_path.read_text()  # --disable-request-logging


def test_slow_clients_are_cut_off(tight):
    trickling = []
    for i in range(20):  # headers never finished
        s = socket.create_connection(("127.0.0.1", tight.port))
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        trickling.append(s)
    idle = socket.create_connection(("127.0.0.1", tight.port))  # says nothing at all
    body = raw_http(tight.port, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                b"Content-Length: 100\r\n\r\n{\"inputs\":", timeout=15)
    head, _, rest = body.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), body
    assert json.loads(rest)["error_type"] == "timeout"
    for s in [*trickling, idle]:
        s.settimeout(10)
        try:
            assert s.recv(1024) == b""  # closed by the server
        except ConnectionResetError:
            pass
        s.close()
    assert post(tight, "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_ctrl_c_drains_within_the_shutdown_timeout_and_exits_zero(tight):
    short = BackgroundStream(tight, {"inputs": "Hello", "parameters": {"max_new_tokens": 8, "details": True}})
    long = BackgroundStream(tight, {"inputs": COUNTING, "parameters": {"max_new_tokens": 400}})
    assert short.first.wait(60) and long.first.wait(60)
    os.killpg(tight.proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground group
    t0 = time.time()
    code = tight.proc.wait(timeout=60)
    took = time.time() - t0
    short.thread.join(10)
    long.thread.join(10)
    assert code == 0, tight.tail()
    assert took < 3 + 10, took
    assert short.events[-1]["details"]["finish_reason"] == "length"  # the shard was not killed by the signal
    assert short.events[-1]["details"]["generated_tokens"] == 8
    assert long.events[-1].get("error_type") == "unavailable", long.events[-1]  # cut off at --shutdown-timeout
    assert "SIGKILL" not in tight.tail(100)


# ---- 1, 2: two instances on one host; a frozen shard -------------------------------------------------------


@pytest.fixture(scope="module")
def frozen():
    s = Server(*SMALL, "--shard-watchdog-timeout", "20").wait_ready()
    yield s
    s.stop()


def test_a_second_instance_on_the_same_socket_is_refused(frozen):
    before = post(frozen, "/generate", {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 6}}).json()
    other = Server(*SMALL, uds=frozen.uds)
    try:
        assert other.proc.wait(timeout=60) == 1
        assert "in use by another running server" in other.tail(), other.tail()
    finally:
        other.stop()
    after = post(frozen, "/generate", {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 6}}).json()
    assert after == before
    assert requests.get(frozen.url("/health")).status_code == 200


def test_the_router_refuses_a_shard_of_another_launch(frozen, model_dir):
    router = ROOT / "target" / "release" / "text-generation-router"
    r = subprocess.run([str(router), "--port", str(free_port()), "--hostname", "127.0.0.1",
                        "--master-shard-uds-path", f"{frozen.uds}-0", "--tokenizer-dir", str(model_dir), *SMALL],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "TESSERA_LAUNCH_TOKEN": "not-this-one"})
    assert r.returncode == 1 and "was not started by this launch" in r.stderr, r.stderr


def test_a_frozen_shard_gets_503s_then_the_watchdog(frozen):
    pid = frozen.shard_pid()
    bg = BackgroundStream(frozen, {"inputs": COUNTING, "parameters": {"max_new_tokens": 30, "details": True}})
    assert bg.first.wait(60)
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.time()
        with ThreadPoolExecutor(2) as ex:
            health, info = ex.map(lambda p: requests.get(frozen.url(p), timeout=30), ["/health", "/info"])
        assert time.time() - t0 < 10
        for r in (health, info):
            assert r.status_code == 503 and r.json()["error_type"] == "unavailable", r.text
        time.sleep(max(0.0, 7 - (time.time() - t0)))  # the router's own ping has noticed by now
        r = post(frozen, "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 2}}, timeout=5)
        assert r.status_code == 503 and "not answering" in r.json()["error"], r.text
    finally:
        os.kill(pid, signal.SIGCONT)
    bg.thread.join(60)
    assert bg.events[-1]["details"]["generated_tokens"] == 30  # the request in flight was not lost
    end = time.time() + 10
    while requests.get(frozen.url("/health"), timeout=10).status_code != 200 and time.time() < end:
        time.sleep(0.2)
    assert post(frozen, "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 2}}).status_code == 200

    # Frozen for longer than --shard-watchdog-timeout: the launcher ends everything, non-zero.
    os.kill(pid, signal.SIGSTOP)
    assert frozen.proc.wait(timeout=90) == 1
    assert "has not answered for" in frozen.tail(20)
    end = time.time() + 10
    while time.time() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[-1].startswith("Z"):
                    break  # killed, waiting to be reaped
        except FileNotFoundError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the frozen shard is still alive")
