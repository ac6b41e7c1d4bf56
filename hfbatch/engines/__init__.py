"""Engines: how a batch's requests are answered (base.Engine). `for_config` picks one by `--engine`."""

from __future__ import annotations

from ..config import RunConfig
from ..errors import UsageError
from ..limits import Capacity
from ..validate import EngineRule
from .base import Engine, Work

ENGINES = ("http", "vllm", "hf-jobs", "ray")

__all__ = ["ENGINES", "Engine", "Work", "endpoint_rule", "for_config"]


def for_config(cfg: RunConfig, *, input_size: int, capacity: Capacity | None = None, warm: bool = True) -> Engine:
    """The engine `cfg.engine` names (imported only when used)."""
    if cfg.engine == "http":
        from .http import HttpEngine

        return HttpEngine(cfg, input_size=input_size, capacity=capacity, warm=warm)
    if cfg.engine == "vllm":
        from .vllm import VllmEngine

        return VllmEngine(cfg)
    if cfg.engine == "hf-jobs":
        from .hf_jobs import HfJobsEngine

        return HfJobsEngine(cfg)
    if cfg.engine == "ray":
        from .ray_engine import RayEngine  # imports ray (the `ray` extra) only now

        return RayEngine(cfg, input_size=input_size)
    raise UsageError(f"--engine {cfg.engine!r}: use one of {', '.join(ENGINES)}")


def endpoint_rule(engine: str, gpu: bool = False) -> EngineRule | None:
    """What the engine adds to validation: the lines it cannot run (None: it runs every valid line). `gpu`: the Ray
    engine runs vLLM's batch runner on its workers (--gpus-per-worker)."""
    if engine in ("vllm", "hf-jobs") or (engine == "ray" and gpu):
        from .vllm_lines import engine_rule

        return engine_rule(engine)
    return None
