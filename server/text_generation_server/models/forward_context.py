"""Per-step metadata installed around a forward pass, so model code stays `forward(ids, positions)`."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

from text_generation_server.attention.base import AttentionBackend


@dataclass
class ForwardContext:
    attention: AttentionBackend  # planned for this step
    lora: Any = None  # LoraStep of this step, or None when no row uses an adapter


_current: ForwardContext | None = None


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    global _current
    prev, _current = _current, ctx
    try:
        yield ctx
    finally:
        _current = prev


def current_context() -> ForwardContext | None:
    return _current


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError("model forward called outside forward_context()")
    return _current
