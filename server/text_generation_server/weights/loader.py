"""Reads safetensors weights of a model directory by name."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

log = logging.getLogger(__name__)


INDEX = "model.safetensors.index.json"


def indexed_files(index: dict) -> list[str]:
    """The safetensors files a `model.safetensors.index.json` names, sorted."""
    return sorted(set(index.get("weight_map", {}).values()))


class WeightError(ValueError):
    """A weight is missing or has the wrong shape."""


class Weights:
    def __init__(self, model_dir: str | Path, dtype: torch.dtype, device: torch.device):
        self.dir = Path(model_dir)
        self.dtype, self.device = dtype, device
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise WeightError(f"no *.safetensors in {self.dir}")
        index = self.dir / INDEX
        if index.is_file():
            files = [self.dir / n for n in indexed_files(json.loads(index.read_text()))]
        log.info("loading weights: %d safetensors files, %.1f MB, from %s", len(files),
                 sum(f.stat().st_size for f in files) / 1e6, self.dir)
        self.numel = 0  # elements read so far: the model's parameter count once it is built
        self._where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    self._where[k] = f

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, shape: tuple[int, ...] | None = None, rows: tuple[int, int] | None = None,
            cols: tuple[int, int] | None = None, pad_rows: int | None = None) -> torch.Tensor:
        """The tensor `name` (its full `shape` checked), or only rows [lo, hi) or columns [lo, hi) of
        it (a tensor-parallel rank's share: only those bytes are read), zero-padded to `pad_rows`."""
        if name not in self._where:
            raise WeightError(f"weight {name!r} not found in {self.dir}")
        with safe_open(str(self._where[name]), framework="pt") as sf:
            part = sf.get_slice(name)
            full = tuple(part.get_shape())
            if shape is not None and full != tuple(shape):
                raise WeightError(f"weight {name!r} has shape {full}, expected {tuple(shape)}")
            if rows is not None:
                t = part[rows[0]:rows[1]]
            elif cols is not None:
                t = part[:, cols[0]:cols[1]]
            else:
                t = sf.get_tensor(name)
        self.numel += t.numel()
        if pad_rows is not None and t.shape[0] < pad_rows:
            t = torch.cat([t, t.new_zeros(pad_rows - t.shape[0], *t.shape[1:])])
        return t.to(device=self.device, dtype=self.dtype).contiguous()
