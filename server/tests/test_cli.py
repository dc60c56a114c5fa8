"""The shard's command line: socket claiming and the JSON log records the launcher parses."""

from __future__ import annotations

import json
import logging
import socket

import pytest

from text_generation_server.cli import JsonFormatter, UsageError, claim_socket


def test_a_stale_socket_is_replaced_and_a_live_one_refused(tmp_path):
    path = str(tmp_path / "s-0")
    claim_socket(path)  # nothing there
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    claim_socket(path)
    live = socket.socket(socket.AF_UNIX)
    live.bind(path)
    live.listen()
    try:
        with pytest.raises(UsageError, match="in use by another running server"):
            claim_socket(path)
    finally:
        live.close()
    (tmp_path / "f-0").write_text("not a socket")
    with pytest.raises(UsageError, match="not a socket"):
        claim_socket(str(tmp_path / "f-0"))


def test_json_records_carry_level_and_traceback():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = logging.LogRecord("text_generation_server.server", logging.ERROR, __file__, 1, "call %s failed", ("prefill",),
                                sys.exc_info())
    out = json.loads(JsonFormatter().format(rec))
    assert out["level"] == "ERROR" and out["message"] == "call prefill failed"
    assert out["logger"] == "text_generation_server.server"
    assert "Traceback" in out["exc_info"] and "ValueError: boom" in out["exc_info"]
