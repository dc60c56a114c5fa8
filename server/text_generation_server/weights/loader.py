"""Reads safetensors weights of a model directory by name."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

log = logging.getLogger(__name__)


class WeightError(ValueError):
    """A weight is missing or has the wrong shape."""


class Weights:
    def __init__(self, model_dir: str | Path, dtype: torch.dtype, device: torch.device):
        self.dir = Path(model_dir)
        self.dtype, self.device = dtype, device
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise WeightError(f"no *.safetensors in {self.dir}")
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            names = set(json.loads(index.read_text())["weight_map"].values())
            files = [self.dir / n for n in sorted(names)]
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

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if name not in self._where:
            raise WeightError(f"weight {name!r} not found in {self.dir}")
        with safe_open(str(self._where[name]), framework="pt") as sf:
            t = sf.get_tensor(name)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise WeightError(f"weight {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        self.numel += t.numel()
        return t.to(device=self.device, dtype=self.dtype).contiguous()
