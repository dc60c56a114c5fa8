"""Tensor parallelism: the shards of one model as the ranks of a torch.distributed group (NCCL on
CUDA, gloo on CPU), and how the model's weights split across them (Megatron-style).

- Attention: each rank owns whole KV groups (a KV head and the query heads that read it), as
  evenly as they split; with fewer KV heads than ranks, each KV head is replicated on
  world / num_kv_heads ranks that split its query heads. q/k/v are column-parallel; o_proj is
  row-parallel: each rank's output is a partial sum, all-reduced.
- MLP: gate/up column-parallel over the intermediate size (split as evenly as it goes), down
  row-parallel, all-reduced. A mixture of experts splits the same way inside every expert
  (each rank holds a column share of all experts; the router is replicated), so every rank
  runs the same experts on the same tokens and one all-reduce sums them.
- Embedding and LM head: vocabulary-parallel (ceil(vocab / world) rows per rank, the last padded).
  A token's embedding comes from the rank owning it (all-reduce of the others' zeros); the
  logits are all-gathered, so every rank samples the same token from the same logits (sampling
  is counter-based: `sampling/noise.py`).
- Norms and rotary tables are replicated.

At world size 1 the group is `SINGLE`: no process group, and the layers skip every collective.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from dataclasses import dataclass

import torch

from text_generation_server.models.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)


class Group:
    """This shard's rank in the tensor-parallel group, and the collectives the model uses."""

    def __init__(self, rank: int = 0, world: int = 1, pg=None):
        self.rank, self.world, self.pg = rank, world, pg

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        if self.world > 1:
            torch.distributed.all_reduce(x, group=self.pg)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] from each rank -> [..., world * n], rank order along the last dimension."""
        if self.world == 1:
            return x
        x = x.contiguous()
        out = torch.empty((self.world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)  # ranks along dim 0
        torch.distributed.all_gather_into_tensor(out, x, group=self.pg)
        return out.view(self.world, *x.shape).movedim(0, -2).reshape(*x.shape[:-1], self.world * x.shape[-1])

    def min(self, n: int, device: torch.device) -> int:
        """The smallest of each rank's `n` (the KV cache every rank can hold)."""
        if self.world == 1:
            return n
        t = torch.tensor([n], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.pg)
        return int(t.item())


SINGLE = Group()


def init_group(rank: int, world: int, master_addr: str, master_port: int, device: torch.device,
               timeout_s: float = 120.0) -> Group:
    """Joins the group of `world` shards (NCCL on CUDA, gloo on CPU). A collective that waits
    longer than `timeout_s` (a rank that died or failed alone) raises instead of hanging."""
    if world == 1:
        return SINGLE
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    torch.distributed.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    log.info("rank %d of %d joined the tensor-parallel group (%s, tcp://%s:%d)", rank, world, backend,
             master_addr, master_port)
    return Group(rank, world, torch.distributed.group.WORLD)


def _share(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous share [lo, hi) of `n` items split as evenly as they go."""
    return rank * n // world, (rank + 1) * n // world


@dataclass(frozen=True)
class Split:
    """How one rank's share of the model is cut out of the checkpoint. Shares need not be equal:
    9 query heads in 3 KV groups over 2 ranks are 3 + 6 (whole groups), an intermediate size of
    1537 is 768 + 769."""

    rank: int
    world: int
    full: ModelConfig
    heads: int  # query heads of this rank
    q_start: int  # its first query head
    kv_heads: int  # KV heads of this rank (1 when replicated)
    kv_start: int  # its first KV head
    inter: tuple[int, int]  # its rows [lo, hi) of the intermediate size
    vocab: int  # vocabulary rows per rank (equal for the gather; the last rank's padded with zeros)

    @classmethod
    def of(cls, cfg: ModelConfig, rank: int = 0, world: int = 1) -> "Split":
        h, kvh = cfg.num_heads, cfg.num_kv_heads
        group = h // kvh  # query heads per KV head
        if kvh >= world:  # whole KV groups per rank
            kv_lo, kv_hi = _share(kvh, world, rank)
            kv_heads, kv_start, heads, q_start = kv_hi - kv_lo, kv_lo, (kv_hi - kv_lo) * group, kv_lo * group
        else:  # each KV head replicated on world / kvh ranks, which split its query heads
            per_kv = world // kvh
            if world % kvh or group % per_kv:
                raise ConfigError(f"--num-shard {world} cannot split the model's {kvh} KV heads of {group} query "
                                  f"heads each: use a number of shards that divides {kvh}, or a multiple of it "
                                  f"that divides {h}")
            kv_heads, kv_start, heads, q_start = 1, rank // per_kv, group // per_kv, rank * (group // per_kv)
        if cfg.intermediate_size < world:
            raise ConfigError(f"--num-shard {world} exceeds the model's intermediate_size {cfg.intermediate_size}")
        return cls(rank, world, cfg, heads, q_start, kv_heads, kv_start, _share(cfg.intermediate_size, world, rank),
                   -(-cfg.vocab_size // world))

    @property
    def local(self) -> ModelConfig:
        """The config of this rank's share (heads, KV heads and intermediate size are local; the
        vocabulary stays whole: logits are gathered)."""
        return dataclasses.replace(self.full, num_heads=self.heads, num_kv_heads=self.kv_heads,
                                   intermediate_size=self.inter[1] - self.inter[0])

    def share(self, n: int) -> tuple[int, int]:
        """This rank's rows [lo, hi) of a size split as evenly as it goes (an expert's intermediate size)."""
        if n < self.world:
            raise ConfigError(f"--num-shard {self.world} exceeds a dimension of {n} the model splits")
        return _share(n, self.world, self.rank)

    def out_rows(self, proj: str) -> tuple[int, int]:
        """Rows [start, end) of a column-parallel projection's [out, in] weight this rank holds."""
        d = self.full.head_dim
        if proj == "q_proj":
            return self.q_start * d, (self.q_start + self.heads) * d
        if proj in ("k_proj", "v_proj"):
            return self.kv_start * d, (self.kv_start + self.kv_heads) * d
        if proj in ("gate_proj", "up_proj"):
            return self.inter
        raise KeyError(proj)

    def in_cols(self, proj: str) -> tuple[int, int]:
        """Columns [start, end) of a row-parallel projection's [out, in] weight this rank holds."""
        if proj == "o_proj":
            d = self.full.head_dim
            return self.q_start * d, (self.q_start + self.heads) * d
        if proj == "down_proj":
            return self.inter
        raise KeyError(proj)

    def vocab_rows(self) -> tuple[int, int]:
        """Vocabulary rows [start, end) this rank holds (end - start < self.vocab on a padded last rank)."""
        start = min(self.rank * self.vocab, self.full.vocab_size)
        return start, min(start + self.vocab, self.full.vocab_size)

    def lora(self, proj: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A LoRA pair (A [r, in], B [out, r]) cut to match its base projection on this rank: B by
        output rows for column-parallel projections, A by input columns for row-parallel ones (its
        partial delta is then summed by the base output's all-reduce)."""
        if self.world == 1:
            return a, b
        if proj in ROW_PARALLEL:
            lo, hi = self.in_cols(proj)
            return a[:, lo:hi].contiguous(), b
        lo, hi = self.out_rows(proj)
        return a, b[lo:hi].contiguous()


ROW_PARALLEL = ("o_proj", "down_proj")
