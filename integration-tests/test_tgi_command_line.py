"""A TGI user's command line: TGI's flag names work where the feature exists here, and flags for
features Tessera does not have are refused at start with a message naming them (not clap's
"unexpected argument")."""

from __future__ import annotations

import requests

from conftest import Server


def test_served_model_name_is_the_name_clients_see():
    s = Server("--served-model-name", "museum-guide").wait_ready()
    try:
        assert requests.get(s.url("/info"), timeout=10).json()["model_id"] == "museum-guide"
        models = requests.get(s.url("/v1/models"), timeout=10).json()["data"]
        assert models[0]["id"] == "museum-guide"
        r = requests.post(s.url("/v1/chat/completions"), timeout=120,
                          json={"model": "museum-guide", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "museum-guide"
    finally:
        s.stop()


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
