"""Process faults: a dead shard takes the launcher down; SIGTERM drains in-flight requests."""

from __future__ import annotations

import os
import signal
import time

import requests

from conftest import BackgroundStream, Server

SMALL = ("--max-input-tokens", "256", "--max-total-tokens", "512", "--max-batch-prefill-tokens", "512")


def test_killed_shard_stops_the_launcher_nonzero_within_10s():
    s = Server(*SMALL).wait_ready()
    try:
        os.kill(s.shard_pid(), signal.SIGKILL)
        t0 = time.time()
        code = s.proc.wait(timeout=10)
        assert code != 0
        assert time.time() - t0 < 10
    finally:
        s.stop()


def test_sigterm_finishes_in_flight_requests_then_exits_zero():
    s = Server(*SMALL).wait_ready()
    bg = BackgroundStream(s, {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 60, "details": True}})
    events = bg.events
    try:
        assert bg.first.wait(60)
        s.proc.send_signal(signal.SIGTERM)
        code = s.proc.wait(timeout=60)
        bg.thread.join(10)
        assert code == 0, s.tail()
        assert events[-1]["details"]["finish_reason"] in ("length", "eos_token")
        assert events[-1]["generated_text"] is not None
        assert len(events) == events[-1]["details"]["generated_tokens"]
    finally:
        s.stop()
