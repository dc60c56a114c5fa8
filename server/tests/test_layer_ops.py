"""The layer ops' reference (the CPU path): what `add_rmsnorm` returns, and which ops a device gets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from text_generation_server.layers.ops import TorchOps, joined, make_ops


def test_add_rmsnorm_is_the_sum_then_the_norm():
    g = torch.Generator().manual_seed(0)
    x, res, w = torch.randn(5, 32, generator=g), torch.randn(5, 32, generator=g), torch.randn(32, generator=g)
    ops = TorchOps()
    h, r = ops.add_rmsnorm(x, res, w, 1e-6)
    assert torch.equal(r, res + x)
    want = w * (r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(h, want)
    assert torch.equal(ops.silu_mul(x, res), torch.nn.functional.silu(x) * res)


def test_joined_views_one_buffer_and_copies_neighbours():
    """gate | up for the fused activation kernels: a view of the fused GEMM's output; a copy of two
    tensors that merely lie side by side (two allocations can: LoRA's new gate and up at batch 1
    once made the view reach past gate's own storage, and the step failed)."""
    fused = torch.randn(3, 8)
    j = joined(*fused.split(4, dim=1))
    assert j.data_ptr() == fused.data_ptr() and torch.equal(j, fused)
    a = np.arange(8, dtype=np.float32)
    gate, up = torch.from_numpy(a[:4]).view(1, 4), torch.from_numpy(a[4:]).view(1, 4)  # two storages
    assert up.data_ptr() == gate.data_ptr() + 4 * gate.element_size()
    j = joined(gate, up)
    assert torch.equal(j, torch.from_numpy(a).view(1, 8)) and j.data_ptr() != gate.data_ptr()
    assert torch.equal(joined(up, gate), torch.cat([up, gate], dim=1))


def test_the_cpu_gets_the_reference_and_bad_settings_are_refused(monkeypatch):
    assert type(make_ops(torch.device("cpu"))) is TorchOps
    monkeypatch.setenv("TESSERA_LAYER_OPS", "fast")
    with pytest.raises(ValueError, match="TESSERA_LAYER_OPS must be fused or torch"):
        make_ops(torch.device("cuda"))


def test_rope_store_kernel_under_the_interpreter():
    """The CUDA rope + cache-write kernel (`layers/rope_store.py`), run by Triton's interpreter on
    the CPU against the reference: rotary from the float32 table, then `write_kv`."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("checked") == 3


def _interpreted() -> None:
    from text_generation_server.layers.rope_store import rope_store
    from text_generation_server.layers.rotary import RotaryEmbedding
    from text_generation_server.models.config import RopeConfig

    for h, kvh, d, rot in ((9, 3, 64, 64), (4, 4, 16, 16), (4, 2, 24, 16)):  # the last: partial rotary
        g = torch.Generator().manual_seed(d)
        t, blocks, bs = 7, 8, 4
        rotary = RotaryEmbedding(RopeConfig(theta=10000.0), rot, 256, torch.device("cpu"), torch.float32)
        qkv = torch.randn(t, (h + 2 * kvh) * d, generator=g)
        q, k, v = (x.view(t, -1, d) for x in qkv.split([h * d, kvh * d, kvh * d], dim=1))
        positions = torch.randint(0, 256, (t,), generator=g)
        locs = torch.randperm(blocks * bs, generator=g)[:t]
        cache = torch.randn(2, blocks, bs, kvh, d, generator=g)
        want, got = cache.clone(), cache.clone()
        want_q, want_k = TorchOps().rope_store(rotary, q, k, v, positions, locs, want[0], want[1])
        got_q, got_k = rope_store(q, k, v, rotary.cos_sin_cache(), positions, locs, got[0], got[1])
        torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert got_q.is_contiguous() and torch.equal(qkv, torch.cat([q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)], 1))
        print("checked")


if __name__ == "__main__":
    _interpreted()
