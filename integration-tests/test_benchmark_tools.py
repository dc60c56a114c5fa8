"""The benchmark tools run on the CPU too, at small sizes: the model writer, the HTTP load
generator (W2 with a plot, TTFT, W4) against the real launcher, the shard benchmark, and the
mixture-of-experts routing count."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from conftest import ROOT, Server

sys.path.insert(0, str(ROOT / "benchmark"))
import make_adapters  # noqa: E402
import make_model  # noqa: E402
import shard_bench  # noqa: E402

LIMITS = ("--max-input-tokens", "64", "--max-total-tokens", "128", "--max-batch-prefill-tokens", "256")


def load(url: str, out, *args: str) -> dict:
    subprocess.run([sys.executable, str(ROOT / "benchmark" / "load.py"), url, "--vocab", "512", "--out", str(out), *args],
                   check=True, capture_output=True, timeout=600)
    return json.loads(out.read_text())


def test_model_writer_load_generator_and_shard_bench_on_cpu(tmp_path):
    model = make_model.write("tiny", tmp_path / "tiny", torch.float32, "cpu")
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["hidden_size"] == 64 and (model / "tokenizer.json").is_file()
    assert make_model.weight_bytes(model) > 0

    make_adapters.write(model, tmp_path / "adapters", 3, 4, list(make_adapters.PROJECTIONS), "cpu")
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["a0", "a1", "a2"]

    s = Server("--model-id", str(model), *LIMITS, "--adapter-source", str(tmp_path / "adapters"),
               "--max-active-adapters", "2").wait_ready()
    try:
        w2 = load(s.base, tmp_path / "w2.json", "--num-requests", "12", "--scale", "0.05", "--rates", "inf,20",
                  "--rate-requests", "6")
        for run, n in (("rate=inf", 12), ("rate=20", 6)):
            r = w2[run]
            assert r["completed"] == n and r["failed"] == 0, r
            for f in ("request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
                      "median_itl_ms", "p99_e2el_ms"):
                assert r[f] > 0, f
        assert (tmp_path / "w2.png").stat().st_size > 1000
        ttft = load(s.base, tmp_path / "ttft.json", "--workload", "ttft", "--ttft-tokens", "60")
        assert ttft["median_ttft_ms"] > 0
        w4 = load(s.base, tmp_path / "w4.json", "--workload", "w4", "--w4-tokens", "8")
        assert [r["completed"] for r in w4["w4"]] == [1, 64]
        w3 = load(s.base, tmp_path / "w3.json", "--workload", "w3", "--num-requests", "8", "--scale", "0.05",
                  "--adapter-counts", "1,3")
        assert w3["warm_failed"] == 0 and w3["base"]["completed"] == 8
        for run, distinct in (("n=1", 1), ("n=3", 3)):
            assert w3[run]["completed"] == 8 and w3[run]["failed"] == 0, w3[run]
            assert w3[run]["ratio_to_base"] > 0 and 1 <= w3[run]["distinct_adapters"] <= distinct
        w7 = load(s.base, tmp_path / "w7.json", "--workload", "w7", "--num-requests", "6", "--w7-chats", "3",
                  "--w7-system-words", "40", "--concurrency", "2")
        assert w7["shared"]["completed"] == 6 and w7["second_turns"]["completed"] == 3, w7
        assert w7["median_ttft_ms"] > 0
    finally:
        s.stop()

    res = shard_bench.run(model, [1, 2], context=16, batch1_context=16, steps=4, vocab=cfg["vocab_size"],
                          shard_args=[], max_prefill=256)
    assert [r["batch"] for r in res["decode"]] == [1, 2]
    assert all(r["step_ms"] > 0 for r in res["decode"])
    assert res["prefill_1k_ms"] > 0
    # Two tensor-parallel ranks (gloo here), every call to both, as the router does (#16's W1).
    tp = shard_bench.run(model, [1, 2], context=16, batch1_context=16, steps=4, vocab=cfg["vocab_size"],
                         shard_args=[], max_prefill=256, num_shard=2)
    assert tp["num_shard"] == 2 and "world_size: 2" in tp["info"], tp["info"]
    assert [r["batch"] for r in tp["decode"]] == [1, 2] and all(r["step_ms"] > 0 for r in tp["decode"])
    # The collectives of one such step, alone, through the shard's own group (gloo here).
    out = tmp_path / "allreduce.json"
    subprocess.run([sys.executable, str(ROOT / "benchmark" / "allreduce.py"), str(model), "--num-shard", "2",
                    "--batches", "1,4", "--iters", "5", "--out", str(out)], check=True, capture_output=True, timeout=300)
    ar = json.loads(out.read_text())
    assert ar["num_shard"] == 2 and [r["batch"] for r in ar["steps"]] == [1, 4]
    assert all(r["eager_ms"] > 0 and r["collectives"] == 2 * cfg["num_hidden_layers"] + 2 for r in ar["steps"])
    one = subprocess.run([sys.executable, str(ROOT / "benchmark" / "allreduce.py"), str(model), "--num-shard", "1"],
                         capture_output=True, text=True, timeout=60)
    assert one.returncode != 0 and "at least 2" in one.stderr


def test_moe_model_writer_and_routing_count_on_cpu(tmp_path):
    """A Mixtral-layout model from the writer loads and serves (the shard's reference MoE path),
    `moe_routing.py` counts the experts its decode steps choose, and the roofline's uniform
    expectation counts the same bytes at batch 1 (top 2 of 4)."""
    model = make_model.write("tiny-mixtral", tmp_path / "moe", torch.float32, "cpu")
    r = subprocess.run([sys.executable, str(ROOT / "benchmark" / "moe_routing.py"), str(model), "--batches", "1,8",
                        "--context", "8", "--steps", "2"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TESSERA_CPU_KV_CACHE_BYTES": str(64 << 20)})
    assert r.returncode == 0, r.stderr[-2000:]
    counts = json.loads(r.stdout)
    assert counts["1"]["experts_per_layer_mean"] == 2 and counts["1"]["layers"] == 2
    assert 2 <= counts["8"]["experts_per_layer_mean"] <= 4
    read, hit = make_model.step_weight_bytes(model, 1)
    assert hit == 2.0 and read < make_model.weight_bytes(model)
    assert make_model.step_weight_bytes(model, 64)[1] > 3.99


def test_decode_gemm_kernel_under_the_interpreter():
    """decode_gemm.py's few-row Triton GEMM (a GPU experiment) computes F.linear: run by Triton's
    interpreter on the CPU, odd sizes included (rows, columns and K past a tile)."""
    code = (
        "import torch, decode_gemm\n"
        "for m, n, k, bn, bk in ((1, 100, 300, 32, 128), (5, 64, 256, 64, 256), (16, 130, 520, 32, 256)):\n"
        "    x, w = torch.randn(m, k), torch.randn(n, k)\n"
        "    torch.testing.assert_close(decode_gemm.linear(x, w, dict(BN=bn, BK=bk)), x @ w.T, rtol=1e-4, atol=1e-3)\n"
        "print('checked')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "benchmark", env={**os.environ, "TRITON_INTERPRET": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "checked" in r.stdout, r.stdout + r.stderr
