"""FlashInfer backend vs the torch reference on random inputs: prefill, decode, cached prefix, odd lengths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from text_generation_server.attention.base import AttentionInputs, write_kv
from text_generation_server.attention.flashinfer import FlashInferAttention
from text_generation_server.attention.torch_ref import TorchAttention

DEV = torch.device("cuda")
H, KVH, D, BS = 32, 8, 128, 16


def make_step(cached: list[int], new: list[int], seed: int = 0, num_blocks: int = 512, dtype=torch.bfloat16):
    g = torch.Generator(device="cpu").manual_seed(seed)
    kc = torch.zeros(num_blocks, BS, KVH, D, dtype=dtype, device=DEV)
    vc = torch.zeros_like(kc)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, locs, qs, ks, vs = [], [], [], [], []
    for c, n in zip(cached, new):
        total = c + n
        blocks = [perm.pop() for _ in range(-(-total // BS))]
        tables.append(blocks)
        k = torch.randn(total, KVH, D, generator=g).to(dtype).to(DEV)
        v = torch.randn(total, KVH, D, generator=g).to(dtype).to(DEV)
        for p in range(c):
            kc[blocks[p // BS], p % BS] = k[p]
            vc[blocks[p // BS], p % BS] = v[p]
        locs += [blocks[p // BS] * BS + p % BS for p in range(c, total)]
        qs.append(torch.randn(n, H, D, generator=g).to(dtype).to(DEV))
        ks.append(k[c:])
        vs.append(v[c:])
    width = max(map(len, tables))
    bt = np.array([t + [0] * (width - len(t)) for t in tables], dtype=np.int32)
    cu = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    kv = np.array([c + n for c, n in zip(cached, new)], dtype=np.int32)
    inputs = AttentionInputs(
        torch.from_numpy(cu).to(DEV), torch.from_numpy(kv).to(DEV), torch.from_numpy(bt).to(DEV),
        torch.tensor(locs, dtype=torch.int64, device=DEV), max(new), int(kv.max()), all(n == 1 for n in new),
        cu, kv, bt,
    )
    return inputs, torch.cat(qs), torch.cat(ks), torch.cat(vs), kc, vc


CASES = {
    "prefill": ([0, 0, 0], [7, 130, 33]),
    "decode": ([5, 300, 16, 1023], [1, 1, 1, 1]),
    "cached_prefix": ([17, 0, 64], [9, 21, 1]),
    "odd_lengths": ([1, 15, 31, 47], [1, 17, 1, 3]),
}


@pytest.mark.parametrize("window,scale,softcap", [(None, None, None), (64, None, None), (64, 0.1, 5.0)])
@pytest.mark.parametrize("case", list(CASES))
def test_flashinfer_matches_reference(case, window, scale, softcap):
    """Each window of a model with sliding and global layers (Gemma), and Gemma 2's scale and soft cap."""
    cached, new = CASES[case]
    inputs, q, k, v, kc, vc = make_step(cached, new)
    fi = FlashInferAttention(H, KVH, D, BS, (None, window), scale, softcap, device=DEV, dtype=torch.bfloat16)
    fi.plan(inputs)
    kc1, vc1 = kc.clone(), vc.clone()
    write_kv(k, v, kc1, vc1, fi.cache_locs)  # the layer's job (ops.rope_store)
    ref = TorchAttention(H, KVH, D, BS, (None, window), scale, softcap)
    ref.plan(inputs)
    kc2, vc2 = kc.clone().float(), vc.clone().float()
    write_kv(k.float(), v.float(), kc2, vc2, ref.cache_locs)
    for w in (window, None):
        out = fi.forward(q, k, v, kc1, vc1, window=w)
        want = ref.forward(q.float(), k.float(), v.float(), kc2, vc2, window=w)
        torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(kc1.float(), kc2)  # both planned the new keys at the same locations
