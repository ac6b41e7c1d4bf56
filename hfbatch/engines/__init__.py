"""Engines: how a batch's requests are answered (base.Engine). `for_config` picks one by `--engine`."""

from __future__ import annotations

from ..config import RunConfig
from ..errors import UsageError
from ..limits import Capacity
from .base import Engine, Work

ENGINES = ("http",)

__all__ = ["ENGINES", "Engine", "Work", "for_config"]


def for_config(cfg: RunConfig, *, input_size: int, capacity: Capacity | None = None, warm: bool = True) -> Engine:
    """The engine `cfg.engine` names (imported only when used)."""
    if cfg.engine == "http":
        from .http import HttpEngine

        return HttpEngine(cfg, input_size=input_size, capacity=capacity, warm=warm)
    raise UsageError(f"--engine {cfg.engine!r}: use one of {', '.join(ENGINES)}")
