"""Tensor parallelism on the CPU (gloo): the default model split over two shards answers token for
token as one shard does (alone, batched, with a LoRA adapter), each shard holds about half of the
weights, and a rank that dies stops the launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import Server, random_lora

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,",
           "List three colours:", "2 + 2 =", "The quick brown fox"]
SMALL = ("--max-input-tokens", "128", "--max-total-tokens", "256", "--max-batch-prefill-tokens", "512")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, model_dir):
    """A random-weight peft adapter on the default model (q/k/v/o/gate/up/down), strong enough to
    change the answers (the test checks that it does)."""
    return random_lora(model_dir, tmp_path_factory.mktemp("tp-adapter") / "a", seed=11)


def _answers(s: Server, adapter_id: str | None, together: bool) -> list[list[int]]:
    def one(prompt):
        params = {"max_new_tokens": 16, "details": True}
        if adapter_id:
            params["adapter_id"] = adapter_id
        r = requests.post(s.url("/generate"), json={"inputs": prompt, "parameters": params}, timeout=120)
        assert r.status_code == 200, r.text
        return [t["id"] for t in r.json()["details"]["tokens"]]

    if not together:
        return [one(p) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(one, PROMPTS))


@pytest.fixture(scope="module")
def servers(adapter):
    one = Server(*SMALL, "--lora-adapters", f"a={adapter}")
    two = Server(*SMALL, "--lora-adapters", f"a={adapter}", "--num-shard", "2")
    try:
        yield one.wait_ready(), two.wait_ready()
    finally:
        one.stop()
        two.stop()


@pytest.mark.parametrize("adapter_id", [None, "a"])
@pytest.mark.parametrize("together", [False, True])
def test_two_shards_answer_as_one(servers, adapter_id, together):
    one, two = servers
    want = _answers(one, adapter_id, together)
    assert _answers(two, adapter_id, together) == want
    if adapter_id:
        assert want != _answers(one, None, together), "the adapter must change the answers to test anything"


def test_each_shard_holds_about_half_of_the_weights(servers):
    one, two = servers
    i1 = requests.get(one.url("/info"), timeout=10).json()
    i2 = requests.get(two.url("/info"), timeout=10).json()
    assert i1["world_size"] == 1 and i2["world_size"] == 2
    (whole,), halves = i1["shard_parameters"], i2["shard_parameters"]
    assert len(halves) == 2 and all(0.4 * whole < h < 0.6 * whole for h in halves), (whole, halves)
    log = two.log_path.read_text()
    assert "rank 1 of 2 joined the tensor-parallel group (gloo" in log


def test_a_rank_that_dies_stops_the_launcher(adapter):
    s = Server(*SMALL, "--num-shard", "2").wait_ready()
    try:
        pids = subprocess.run(["pgrep", "-f", f"text-generation-server serve .*--uds-path={s.uds}"],
                              capture_output=True, text=True).stdout.split()
        assert len(pids) == 2, pids
        rank1 = [p for p in pids if "--rank=1" in open(f"/proc/{p}/cmdline").read().replace("\0", " ")]
        os.kill(int(rank1[0]), signal.SIGKILL)
        t0 = time.time()
        code = s.proc.wait(timeout=10)
        assert code != 0 and time.time() - t0 < 10
        left = subprocess.run(["pgrep", "-f", s.uds], capture_output=True, text=True).stdout.split()
        assert not left, f"processes left behind: {left}"
    finally:
        s.stop()
