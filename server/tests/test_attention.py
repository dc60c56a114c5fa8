"""The torch reference backend over the paged cache vs. plain per-sequence attention."""

from __future__ import annotations

import math

import pytest
import torch

from text_generation_server.attention.base import AttentionInputs, write_kv
from text_generation_server.attention.torch_ref import TorchAttention

H, KVH, D, BS = 4, 2, 8, 4


def naive(q, k, v, window=None, scale=None, softcap=None):
    """q: [n, H, D] (the last n positions), k/v: [L, KVH, D] -> [n, H, D]."""
    n, L = q.shape[0], k.shape[0]
    k = k.repeat_interleave(H // KVH, dim=1)
    v = v.repeat_interleave(H // KVH, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * (scale or 1 / math.sqrt(D))
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    qpos = torch.arange(L - n, L)[:, None]
    kpos = torch.arange(L)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("window,scale,softcap", [(None, None, None), (3, None, None), (3, 0.3, 2.0), (None, 0.3, 2.0)])
def test_mixed_prefill_and_decode_step(window, scale, softcap):
    """One step where sequences have cached prefixes of different lengths and new tokens of different counts."""
    g = torch.Generator().manual_seed(0)
    cached = [0, 5, 9, 1]  # tokens already in the cache
    new = [7, 1, 3, 1]  # tokens this step
    num_blocks = 40
    kc = torch.zeros(num_blocks, BS, KVH, D)
    vc = torch.zeros(num_blocks, BS, KVH, D)
    perm = torch.randperm(num_blocks, generator=g).tolist()  # scattered blocks
    tables, full_k, full_v, locs, qs = [], [], [], [], []
    for c, n in zip(cached, new):
        L = c + n
        blocks = [perm.pop() for _ in range(-(-L // BS))]
        tables.append(blocks)
        k = torch.randn(L, KVH, D, generator=g)
        v = torch.randn(L, KVH, D, generator=g)
        for p in range(c):  # the prefix is already cached
            kc[blocks[p // BS], p % BS] = k[p]
            vc[blocks[p // BS], p % BS] = v[p]
        locs += [blocks[p // BS] * BS + p % BS for p in range(c, L)]
        full_k.append(k)
        full_v.append(v)
        qs.append(torch.randn(n, H, D, generator=g))
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    cu = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32)
    inputs = AttentionInputs(cu, torch.tensor([c + n for c, n in zip(cached, new)], dtype=torch.int32), bt,
                             torch.tensor(locs), max(new), max(c + n for c, n in zip(cached, new)), False)
    be = TorchAttention(H, KVH, D, BS, (None, window), scale, softcap)  # a model of sliding and global layers
    be.plan(inputs)
    assert [g.max_q for g in be._groups] == [1, 7], "decoding rows padded apart from the prompts"
    new_k = torch.cat([k[c:] for k, c in zip(full_k, cached)])
    new_v = torch.cat([v[c:] for v, c in zip(full_v, cached)])
    write_kv(new_k, new_v, kc, vc, be.cache_locs)  # the layer's job (ops.rope_store)
    for w in (window, None):  # a layer of each kind reads the same plan
        out = be.forward(torch.cat(qs), new_k, new_v, kc, vc, window=w)
        want = torch.cat([naive(q, k, v, w, scale, softcap) for q, k, v in zip(qs, full_k, full_v)])
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    # The new keys landed in the cache at their locations.
    flat = kc.view(-1, KVH, D)
    torch.testing.assert_close(flat[torch.tensor(locs)], new_k)
