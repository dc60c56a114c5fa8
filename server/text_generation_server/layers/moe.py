"""The mixture-of-experts MLP (Mixtral, Qwen2/3-MoE): a router picks each token's top-k experts,
whose gated MLPs' outputs are summed, weighted by the router's softmax (renormalised over the
chosen k when the model does), plus a shared expert gated by a sigmoid where the model has one
(Qwen2-MoE).

The experts run through `moe_triton.fused_moe` on CUDA (grouped GEMMs over the pairs sorted by
expert) and through `reference` elsewhere: one GEMM pair per expert that any token chose.
Under tensor parallelism every rank holds every expert's share of the intermediate size (split by
columns like the dense MLP); the router is replicated and the partial outputs are all-reduced.
LoRA does not reach the experts (adapters that target them are refused at load).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from text_generation_server.layers.ops import TorchOps


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int64). On CUDA one
    Triton kernel (`moe_triton.route_topk`) instead of `route_torch`'s five or six."""
    if logits.is_cuda:
        from text_generation_server.layers.moe_triton import route_topk

        return route_topk(logits, top_k, renormalize)
    return route_torch(logits, top_k, renormalize)


def route_torch(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`route` in torch: the CPU path and the kernel's oracle."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
              act_mul: Callable) -> torch.Tensor:
    """The experts one by one (the CPU path, and the oracle of the kernel): same arguments as
    `moe_triton.fused_moe`."""
    out = torch.zeros_like(x)
    inter = w13.shape[1] // 2
    for e in torch.unique(ids).tolist():
        rows, which = torch.nonzero(ids == e, as_tuple=True)
        h = F.linear(x[rows], w13[e])
        y = F.linear(act_mul(h[:, :inter], h[:, inter:]), w2[e])
        out.index_add_(0, rows, (y * weights[rows, which, None]).to(out.dtype))
    return out


class SparseMoe:
    """`experts(e)` names expert e's (gate, up, down) tensors; `share`: this rank's columns of
    the expert intermediate size; `shared`: the shared expert (an `MLP`) and its gate's tensor."""

    def __init__(self, w, router: str, experts: Callable[[int], tuple[str, str, str]], num_experts: int,
                 hidden: int, inter: int, share: tuple[int, int], top_k: int, renormalize: bool, act: str, group,
                 shared=None, shared_gate: str | None = None):
        lo, hi = share
        whole = (lo, hi) == (0, inter)
        self.router = w.get(router, (num_experts, hidden))  # [E, H], device, replicated
        w13, w2 = [], []
        for e in range(num_experts):
            g, u, d = experts(e)
            rows = None if whole else (lo, hi)
            w13.append(torch.cat([w.get(g, (inter, hidden), rows=rows), w.get(u, (inter, hidden), rows=rows)]))
            w2.append(w.get(d, (hidden, inter), cols=None if whole else (lo, hi)))
        self.w13 = torch.stack(w13)  # [E, 2 * local inter, H], device, fixed
        self.w2 = torch.stack(w2)  # [E, H, local inter], device, fixed
        del w13, w2
        self.top_k, self.renormalize, self.act, self.group = top_k, renormalize, act, group
        self.shared = shared
        self.shared_gate = w.get(shared_gate, (1, hidden)) if shared_gate else None
        self.kernel = None
        if self.w13.is_cuda:
            from text_generation_server.layers.moe_triton import fused_moe

            self.kernel = fused_moe

    def __call__(self, x: torch.Tensor, ops: TorchOps) -> torch.Tensor:
        weights, ids = route(F.linear(x, self.router), self.top_k, self.renormalize)

        def act_mul(gate, up):
            return ops.act_mul(self.act, gate, up)

        run = self.kernel or reference
        out = run(x, self.w13, self.w2, weights, ids, act_mul)
        if self.shared is not None:
            out = out + torch.sigmoid(F.linear(x, self.shared_gate)) * self.shared.partial(x, ops)
        return self.group.all_reduce(out)
