"""The layer ops' reference (the CPU path): what `add_rmsnorm` returns, and which ops a device gets."""

from __future__ import annotations

import pytest
import torch

from text_generation_server.layers.ops import TorchOps, make_ops


def test_add_rmsnorm_is_the_sum_then_the_norm():
    g = torch.Generator().manual_seed(0)
    x, res, w = torch.randn(5, 32, generator=g), torch.randn(5, 32, generator=g), torch.randn(32, generator=g)
    ops = TorchOps()
    h, r = ops.add_rmsnorm(x, res, w, 1e-6)
    assert torch.equal(r, res + x)
    want = w * (r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(h, want)
    assert torch.equal(ops.silu_mul(x, res), torch.nn.functional.silu(x) * res)


def test_the_cpu_gets_the_reference_and_bad_settings_are_refused(monkeypatch):
    assert type(make_ops(torch.device("cpu"))) is TorchOps
    monkeypatch.setenv("TESSERA_LAYER_OPS", "fast")
    with pytest.raises(ValueError, match="TESSERA_LAYER_OPS must be fused or torch"):
        make_ops(torch.device("cuda"))
