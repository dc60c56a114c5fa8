"""The CUDA home of resident adapters: every adapter has a slot in stacked, rank-padded weight
tensors, one pair per layer and projection group (`GROUPS`: q/k/v, o, gate/up, down), which the
LoRA kernels (triton_lora.py; segment.py) index by each row's slot. Shapes depend only on the
number of slots, so steps that use them can be captured in CUDA graphs.

Slot 0 is all zeros: base-model rows (and CUDA-graph padding rows) use it and get a zero delta. B
is stored pre-multiplied by the adapter's scaling; ranks below `max_rank` are zero-padded, which
leaves the product unchanged.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from text_generation_server.lora.adapter import GROUPS, Adapter, projection_shapes
from text_generation_server.lora.peft_config import bad
from text_generation_server.models.config import ModelConfig


class SlotTable:
    """Per (layer, group): A [S+1, G*R, in], projection g in rows g*R..(g+1)*R; and
    B [S+1, sum of outs, R], projection g in the rows of its columns in the group's fused output
    (`cols[group]`). Slot 0 zero."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, num_slots: int, max_rank: int):
        # A power of two (at least 16): the Triton kernels tile the rank whole.
        max_rank = 1 << (max(16, max_rank) - 1).bit_length()
        self.num_slots, self.max_rank, self.device = num_slots, max_rank, device
        shapes = projection_shapes(cfg)
        self.a: dict[tuple[int, tuple[str, ...]], torch.Tensor] = {}
        self.b: dict[tuple[int, tuple[str, ...]], torch.Tensor] = {}
        self.cols: dict[tuple[str, ...], list[int]] = {}  # group -> column offsets [0, out0, out0+out1, ..., total]
        self.groups = tuple(g for g in GROUPS if g[0] in shapes)  # a mixture of experts: attention only
        for group in self.groups:
            outs = [shapes[p][0] for p in group]
            self.cols[group] = [sum(outs[:i]) for i in range(len(outs) + 1)]
            in_f = shapes[group[0]][1]
            for layer in range(cfg.num_layers):
                self.a[(layer, group)] = torch.zeros(num_slots + 1, len(group) * max_rank, in_f, dtype=dtype, device=device)
                self.b[(layer, group)] = torch.zeros(num_slots + 1, sum(outs), max_rank, dtype=dtype, device=device)
        self._group_of = {p: (g, i) for g in self.groups for i, p in enumerate(g)}
        self._free = list(range(num_slots, 0, -1))
        self._lock = threading.Lock()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.a, self.b) for t in d.values())

    def launch_every_group(self, step, rows: int, dtype: torch.dtype) -> None:
        """`step` (a LoRA step over this table) on zero inputs of `rows` tokens for every projection
        group of layer 0, into scratch outputs: what compiles a backend's kernels at warmup."""
        for group, cols in self.cols.items():
            x = torch.zeros(rows, self.a[(0, group)].shape[2], dtype=dtype, device=self.device)
            ys = list(torch.zeros(rows, cols[-1], dtype=dtype, device=self.device).split(
                [cols[i + 1] - cols[i] for i in range(len(group))], dim=1))
            step.apply(0, group, x, ys)

    def weights(self, layer: int, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One projection's views: A [S+1, R, in], B [S+1, out, R] (B scaled)."""
        group, i = self._group_of[proj]
        r, cols = self.max_rank, self.cols[group]
        return self.a[(layer, group)][:, i * r:(i + 1) * r], self.b[(layer, group)][:, cols[i]:cols[i + 1]]

    def check(self, host: Adapter) -> None:
        if host.rank > self.max_rank:
            raise bad(host.name, f"rank {host.rank} is above --max-lora-rank {self.max_rank}")

    def take(self) -> int | None:
        with self._lock:
            return self._free.pop() if self._free else None

    def give_back(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def write(self, slot: int, host: Adapter) -> None:
        """Copies a host adapter into `slot` (which no step is using) on a side stream."""
        self.check(host)
        r, big_r = host.rank, self.max_rank
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            for (layer, group), a_all in self.a.items():
                a, b = a_all[slot], self.b[(layer, group)][slot]
                a.zero_()
                b.zero_()
                cols = self.cols[group]
                for i, proj in enumerate(group):
                    w = host.weights.get((layer, proj))
                    if w is None:
                        continue
                    ha, hb = w[0], w[1] * host.scaling
                    if stream is not None:
                        ha, hb = ha.pin_memory(), hb.pin_memory()
                    a[i * big_r:i * big_r + r].copy_(ha, non_blocking=True)
                    b[cols[i]:cols[i + 1], :r].copy_(hb, non_blocking=True)
        if stream is not None:
            stream.synchronize()
