"""Where adapters come from and which are resident: a name -> directory registry
(`--lora-adapters name=path`, `--adapter-source DIR`) and a device-resident LRU pool of at most
`max_active` adapters."""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from pathlib import Path

import torch

from text_generation_server.errors import ErrorCode, ShardError
from text_generation_server.lora.adapter import Adapter, load_adapter
from text_generation_server.models.config import ModelConfig

log = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str) -> None:
    """Adapter names are plain names: no path separators, no `..`, nothing absolute."""
    if not _NAME.match(name) or ".." in name:
        raise ShardError(ErrorCode.ADAPTER_NOT_FOUND, f"invalid adapter name {name!r}: letters, digits, '.', '_', '-' only")


class AdapterPool:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, static: dict[str, Path],
                 source: Path | None, max_active: int):
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.static = dict(static)
        self.source = source.resolve() if source else None
        self.max_active = max(1, max_active)
        self.active: OrderedDict[str, Adapter] = OrderedDict()  # LRU order, most recent last
        self.loads = 0
        self.evictions = 0
        for name in self.static:
            check_name(name)

    def path(self, name: str) -> Path:
        check_name(name)
        if name in self.static:
            return self.static[name]
        if self.source is not None:
            p = (self.source / name).resolve()
            if p.parent == self.source and p.is_dir():
                return p
        raise ShardError(ErrorCode.ADAPTER_NOT_FOUND, f"adapter {name!r} is not loaded and not in the adapter source")

    def known(self) -> list[str]:
        names = set(self.static) | set(self.active)
        if self.source is not None and self.source.is_dir():
            names |= {p.name for p in self.source.iterdir() if (p / "adapter_config.json").is_file()}
        return sorted(names)

    def get(self, names: set[str]) -> dict[str, Adapter]:
        """The adapters of one step, loading missing ones and evicting the least recently used
        (never one this step needs). More distinct adapters than `max_active` in one step is allowed
        for that step: the pool shrinks back afterwards."""
        out = {}
        for name in names:
            if name in self.active:
                self.active.move_to_end(name)
            else:
                adapter = load_adapter(name, self.path(name), self.cfg, self.dtype, self.device)
                self.active[name] = adapter
                self.loads += 1
                log.info("loaded adapter %s (rank %d, %d projections)", name, adapter.rank, len(adapter.weights))
            out[name] = self.active[name]
        while len(self.active) > self.max_active:
            victim = next((n for n in self.active if n not in names), None)
            if victim is None:
                break
            del self.active[victim]
            self.evictions += 1
            log.info("evicted adapter %s", victim)
        return out

    def register(self, name: str, path: Path) -> None:
        check_name(name)
        load_adapter(name, path, self.cfg, self.dtype, torch.device("cpu"))  # validate before accepting
        self.static[name] = path

    def unregister(self, name: str) -> None:
        if name not in self.static and name not in self.active:
            raise ShardError(ErrorCode.ADAPTER_NOT_FOUND, f"adapter {name!r} is not loaded")
        self.static.pop(name, None)
        self.active.pop(name, None)
