"""Where adapters come from and which are resident.

A registry maps names to PEFT directories (`--lora-adapters name=path`, `LoadAdapter` with a path,
or a subdirectory of `--adapter-source`); at most `max_active` adapters are resident on the device
at once, least recently used evicted first. On CUDA the resident adapters live in a SlotTable (slots.py,
read by the LoRA kernels); elsewhere each keeps its own tensors for the grouped torch path.

Loading (disk -> host -> device) runs in the caller's thread, outside the pool's lock, so the
`LoadAdapter` RPC can run beside a step. The router decides residency (it sends LoadAdapter /
UnloadAdapter and never wants more than `max_active`); a step that still meets a non-resident
adapter loads it synchronously, never evicting one a live batch uses.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from text_generation_server.errors import ErrorCode, ShardError
from text_generation_server.lora.adapter import CONFIG, WEIGHTS, Adapter, probe_adapter, read_adapter, to_device
from text_generation_server.models.config import ModelConfig

log = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def is_plain_name(name: str) -> bool:
    """Adapter names are plain names: no path separators, no `..`, nothing absolute."""
    return bool(_NAME.match(name)) and ".." not in name


def check_name(name: str) -> None:
    if not is_plain_name(name):
        raise ShardError(ErrorCode.ADAPTER_NOT_FOUND, f"invalid adapter name {name!r}: letters, digits, '.', '_', '-' only")


@dataclass
class Resident:
    adapter: Adapter  # device tensors (torch path) or host tensors (slot path)
    slot: int  # SlotTable slot, 0 when the pool has no table
    nbytes: int


class AdapterPool:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, static: dict[str, Path],
                 source: Path | None, max_active: int, slots=None, split=None):
        """`cfg`: the checkpoint's config (adapters are checked against it); `slots`: a SlotTable
        (CUDA kernels) or None (grouped torch path); `split`: this rank's `parallel.Split` (each
        adapter is cut to match it), None at world size 1."""
        self.cfg, self.dtype, self.device, self.split = cfg, dtype, device, split
        self.static = dict(static)
        self.source = source.resolve() if source else None
        self.max_active = max(1, max_active)
        self.slots = slots
        self.active: OrderedDict[str, Resident] = OrderedDict()  # LRU order, most recent last
        self.ranks: dict[str, int] = {}  # rank of every adapter read so far
        self.loads = 0
        self.evictions = 0
        self._lock = threading.RLock()
        self._loading: dict[str, threading.Event] = {}
        # name -> (files' stamp, problem or None): the last verdict on an adapter's files, so that
        # listings probe each adapter once per change and a failed load marks it until it changes.
        self._verdicts: dict[str, tuple[tuple | None, str | None]] = {}
        for name in self.static:
            check_name(name)

    @property
    def enabled(self) -> bool:
        """Whether any adapter can ever be used (otherwise steps skip the LoRA machinery)."""
        return bool(self.static) or self.source is not None

    # ---- the registry ----------------------------------------------------------------------

    def path(self, name: str) -> Path:
        check_name(name)
        if name in self.static:
            return self.static[name]
        if self.source is not None:
            p = (self.source / name).resolve()
            if p.parent == self.source and p.is_dir():
                return p
        raise ShardError(ErrorCode.ADAPTER_NOT_FOUND, f"adapter {name!r} is not loaded and not in the adapter source")

    def source_path(self, path: str) -> Path:
        """A client-given adapter path, accepted only inside the adapter source."""
        if self.source is None:
            raise ShardError(ErrorCode.INVALID_REQUEST, "loading adapters by path needs the shard's --adapter-source")
        if "\0" in path or len(path) > 4096:
            raise ShardError(ErrorCode.INVALID_REQUEST, "adapter path must be at most 4096 characters, without NUL")
        p = (self.source / path).resolve()  # absolute `path` replaces source, then must still be inside
        if p == self.source or self.source not in p.parents:
            raise ShardError(ErrorCode.INVALID_REQUEST, f"adapter path {path!r} is outside the adapter source")
        if not p.is_dir():
            raise ShardError(ErrorCode.ADAPTER_NOT_FOUND, f"adapter path {path!r}: no such directory in the adapter source")
        return p

    def _root(self, path: Path) -> Path | None:
        """Where an adapter's files must lie: inside the adapter source for adapters found there
        (a link to elsewhere is refused); operator-given paths (`--lora-adapters`) are trusted."""
        if self.source is not None and self.source in path.parents:
            return self.source
        return None

    @staticmethod
    def _stamp(path: Path) -> tuple | None:
        """Identifies the adapter files' current version without reading them."""
        try:
            st = [os.stat(path / f) for f in (CONFIG, WEIGHTS)]
        except OSError:
            return None
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in st)

    def _problem(self, name: str) -> str | None:
        """Why a listed adapter cannot be used (the cheap checks: config, tensor names, shapes; or a
        failed load since its files last changed), or None."""
        try:
            path = self.path(name)
        except ShardError as e:
            return e.message
        stamp = self._stamp(path)
        seen = self._verdicts.get(name)
        if seen is not None and seen[0] == stamp:
            return seen[1]
        try:
            self.ranks[name] = probe_adapter(name, path, self.cfg, self._root(path))
            problem = None
        except ShardError as e:
            log.warning("adapter %s is not usable: %s", name, e.message)
            problem = e.message
        self._verdicts[name] = (stamp, problem)
        return problem

    def listing(self) -> tuple[list[tuple[str, int, bool, int]], list[tuple[str, str]]]:
        """Every adapter that can be named: the usable ones as (name, rank or 0, resident, device
        bytes) -- resident ones, and registered or source ones whose files pass the cheap checks --
        and the others as (name, problem)."""
        with self._lock:
            names = set(self.static)
            if self.source is not None and self.source.is_dir():
                names |= {p.name for p in self.source.iterdir() if is_plain_name(p.name)}
            problems = {n: self._problem(n) for n in names - set(self.active)}
            usable = sorted(set(self.active) | {n for n, why in problems.items() if why is None})
            return [self.info(n) for n in usable], sorted((n, why) for n, why in problems.items() if why is not None)

    def known(self) -> list[tuple[str, int, bool, int]]:
        """The usable adapters of `listing`."""
        return self.listing()[0]

    def register(self, name: str, path: Path) -> Adapter:
        """Validates the adapter at `path` and registers it under `name`; returns it on the host."""
        check_name(name)
        host = self._read(name, path)
        with self._lock:
            if name in self.static and self.static[name] != path:
                raise ShardError(ErrorCode.INVALID_REQUEST, f"adapter {name!r} is already registered with another path")
            self.static[name] = path
        return host

    # ---- residency -------------------------------------------------------------------------

    def _read(self, name: str, path: Path) -> Adapter:
        stamp = self._stamp(path)
        try:
            host = read_adapter(name, path, self.cfg, self.dtype, self._root(path), self.split)
            if self.slots is not None:
                self.slots.check(host)
        except ShardError as e:
            if e.code == ErrorCode.BAD_ADAPTER:
                with self._lock:
                    self._verdicts[name] = (stamp, e.message)
            raise
        with self._lock:
            self._verdicts[name] = (stamp, None)
        self.ranks[name] = host.rank
        return host

    def load(self, name: str, host: Adapter | None = None, pinned: Callable[[], frozenset[str]] = frozenset) -> Resident:
        """Makes `name` resident (reading it unless `host` is given), evicting the least recently used
        adapter not in `pinned()` when the pool is full. Safe to call from several threads."""
        while True:
            with self._lock:
                if name in self.active:
                    self.active.move_to_end(name)
                    return self.active[name]
                event = self._loading.get(name)
                if event is None:
                    self._loading[name] = threading.Event()
                    break
            event.wait()  # another thread is loading it; then look again
        try:
            t0 = time.perf_counter()
            if host is None:
                host = self._read(name, self.path(name))
            with self._lock:
                while len(self.active) >= self.max_active:
                    if not self._evict_one(pinned() | {name}):
                        break
            res = self._place(host)
            with self._lock:
                self.active[name] = res
                self.loads += 1
            log.info("loaded adapter %s (rank %d, %d projections, %.1f MiB) in %.0f ms", name, host.rank,
                     len(host.weights), res.nbytes / 2**20, (time.perf_counter() - t0) * 1e3)
            return res
        finally:
            with self._lock:
                self._loading.pop(name).set()

    def _place(self, host: Adapter) -> Resident:
        if self.slots is None:
            dev = to_device(host, self.device)
            return Resident(dev, 0, dev.nbytes())
        slot = self.slots.take()
        if slot is None:
            with self._lock:
                if not self._evict_one(frozenset({host.name})):
                    raise ShardError(ErrorCode.OUT_OF_MEMORY, f"no free adapter slot for {host.name!r}: "
                                     f"all {self.slots.num_slots} are in use by running requests")
            slot = self.slots.take()
        self.slots.write(slot, host)
        return Resident(host, slot, host.nbytes())

    def _evict_one(self, keep: frozenset[str] | set[str]) -> bool:
        victim = next((n for n in self.active if n not in keep), None)
        if victim is None:
            return False
        self._drop(victim)
        self.evictions += 1
        log.info("evicted adapter %s", victim)
        return True

    def _drop(self, name: str) -> None:
        res = self.active.pop(name)
        if self.slots is not None and res.slot:
            self.slots.give_back(res.slot)

    def get(self, names: set[str], pinned: Callable[[], frozenset[str]] = frozenset) -> dict[str, Resident]:
        """The resident adapters of one step, loading any missing one (never evicting a name in
        `names` or `pinned()`, which is asked for only when something must load)."""
        with self._lock:
            if all(n in self.active for n in names):  # every step after the first: no loading
                for n in names:
                    self.active.move_to_end(n)
                return {n: self.active[n] for n in names}
        keep = frozenset(names)
        return {n: self.load(n, pinned=lambda: pinned() | keep) for n in names}

    def info(self, name: str) -> tuple[str, int, bool, int]:
        """(name, rank or 0, resident, device bytes) of one adapter."""
        with self._lock:
            res = self.active.get(name)
            return name, self.ranks.get(name, 0), res is not None, res.nbytes if res else 0

    def unload(self, name: str, forget: bool) -> None:
        check_name(name)
        with self._lock:
            known = name in self.static or name in self.active
            if name in self.active:
                self._drop(name)
                self.evictions += 1
                log.info("unloaded adapter %s", name)
            if forget:
                self.static.pop(name, None)
        if not known:
            raise ShardError(ErrorCode.ADAPTER_NOT_FOUND, f"adapter {name!r} is not loaded")
