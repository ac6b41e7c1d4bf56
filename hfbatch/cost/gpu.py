"""GPU cost: Jobs hardware (flavors, prices, GPU memory) + a model's size + tokens -> minutes and USD of a vLLM
run, the throughput priors and the measurements that replace them, and the cost report of a run on GPUs.

Every figure here is an estimate and says on what it rests (`basis`):

- Start-up (`startup_seconds`): pulling the vLLM image (IMAGE_PULL_SECONDS, about 10 GB at ~100 MB/s) plus
  loading the weights (downloaded from the Hub at WEIGHTS_BYTES_PER_SECOND) plus the engine's own start
  (ENGINE_INIT_SECONDS: CUDA graphs, compilation). A run on this machine has no image to pull.
- Throughput (`prior_tokens_per_second`): aggregate tokens per second (input + output) of vLLM serving an
  8B-parameter BF16 model on one GPU of the class (GPU_PRIORS, with the source of each figure), scaled by
  16 GB / the model's weights (decoding reads every weight per step: it is bound by memory bandwidth; at most
  x4 for small models; a mixture of experts reads only its active experts, so it runs faster than this says)
  and by the number of GPUs (x0.8 each beyond the first: tensor parallelism is not free).
- A finished run on GPUs stores its measured figures per (flavor, model) under $HFBATCH_HOME
  (gpu_throughput.json): later estimates use them instead of the priors, and say so.
- Fit: the weights (parameters x bytes per parameter, from the Hub's safetensors metadata) must take at most
  FIT_FRACTION of the flavor's GPU memory, the rest being vLLM's KV cache and activations.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from ..storage import home, read_json, write_json

IMAGE_PULL_SECONDS = 120.0
WEIGHTS_BYTES_PER_SECOND = 250e6
ENGINE_INIT_SECONDS = 60.0
FIT_FRACTION = 0.75
REFERENCE_PARAMS = 8e9
REFERENCE_BYTES = 2 * REFERENCE_PARAMS  # the priors' model: 8B parameters in BF16
MEASURED_FILE = "gpu_throughput.json"
MEASURED_SCHEMA = 1
# (aggregate tokens/s for an 8B BF16 model on one GPU, where the figure comes from)
GPU_PRIORS: dict[str, tuple[float, str]] = {
    "H100": (12_500.0, "morphllm.com vLLM benchmarks (April 2026): Llama-3.1-8B BF16 on 1xH100"),
    "H200": (12_500.0, "no H200 figure found: assumed equal to H100 (H200 has more memory bandwidth)"),
    "A100": (6_250.0, "H100 / 2 (Lambda's vLLM 0.6 benchmarks: H100 about 2x A100)"),
    "A10G": (1_460.0, "neuralmagic CI, vLLM 0.2, Llama-2-7B: 3.8 requests/s x 384 tokens (256 in, 128 out)"),
    "L40S": (2_900.0, "no L40S figure found: assumed 2x A10G (about 1.4x its memory bandwidth, 2x its compute)"),
    "L4": (730.0, "no L4 figure found: assumed A10G / 2 (half its memory bandwidth)"),
    "T4": (580.0, "no T4 figure found: assumed 0.4x A10G (half its memory bandwidth, no BF16)"),
    "RTX PRO 6000": (6_250.0, "no RTX PRO 6000 figure found: assumed equal to A100"),
}
# GPU memory per GPU (GB) of the accelerators Jobs offer; the hardware list's `vram` is used otherwise.
GPU_MEMORY_GB = {"T4": 16.0, "L4": 24.0, "A10G": 24.0, "L40S": 48.0, "A100": 80.0, "H100": 80.0, "H200": 141.0,
                 "RTX PRO 6000": 96.0}
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 2, "BF16": 2, "F16": 2, "I32": 4, "U32": 4, "I16": 2,
                "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}  # F32 is served in 16 bits
_GB_RE = re.compile(r"([0-9.]+)\s*([GMT]i?B)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Flavor:
    """One Jobs hardware flavor, as `list_jobs_hardware()` describes it."""

    name: str
    pretty_name: str
    gpu: str | None  # the accelerator's model ("L4", "A100", ...); None for CPU flavors
    gpus: int
    memory_gb: float  # GPU memory of the whole flavor
    usd_per_minute: float

    @property
    def usd_per_hour(self) -> float:
        return self.usd_per_minute * 60


def flavors_from(hardware: list[Any]) -> dict[str, Flavor]:
    """huggingface_hub's JobHardwareInfo list -> {name: Flavor} (GPU and CPU flavors; prices per minute)."""
    out: dict[str, Flavor] = {}
    for h in hardware:
        acc = getattr(h, "accelerator", None)
        gpu = _gpu_class(str(acc.model)) if acc is not None else None
        try:
            gpus = int(str(acc.quantity)) if acc is not None else 0
        except ValueError:
            gpus = 1
        per_gpu = GPU_MEMORY_GB.get(gpu or "")
        memory = per_gpu * gpus if per_gpu else _gb(str(acc.vram)) if acc is not None else 0.0
        unit = float(h.unit_cost_usd)
        if str(getattr(h, "unit_label", "minute")).lower().startswith("hour"):
            unit /= 60
        out[h.name] = Flavor(h.name, h.pretty_name, gpu, gpus, memory, unit)
    return out


def _gpu_class(model: str) -> str:
    m = model.upper().replace("NVIDIA", "").strip()
    for known in sorted(GPU_PRIORS, key=len, reverse=True):
        if known.replace(" ", "") in m.replace(" ", "").replace("-", ""):
            return known
    return m


def _gb(text: str) -> float:
    m = _GB_RE.search(text)
    if not m:
        return 0.0
    unit = m.group(2).upper()[0]
    return float(m.group(1)) * {"M": 1 / 1024, "G": 1.0, "T": 1024.0}[unit]


@dataclass(frozen=True, slots=True)
class ModelSize:
    """A model's size from the Hub's safetensors metadata (None: the Hub does not say)."""

    params: int | None
    weights_bytes: int | None


def model_size(info: Any) -> ModelSize:
    """huggingface_hub's ModelInfo (asked with expand=["safetensors"]) -> ModelSize."""
    st = getattr(info, "safetensors", None)
    if st is None:
        return ModelSize(None, None)
    params = getattr(st, "parameters", None) or {}
    total = getattr(st, "total", None)
    weights = sum(int(n) * _DTYPE_BYTES.get(str(dtype).upper(), 2) for dtype, n in params.items()) or None
    if weights is None and isinstance(total, int):
        weights = 2 * total
    return ModelSize(total if isinstance(total, int) else None, weights)


def fits(size: ModelSize, flavor: Flavor) -> bool | None:
    """Can the flavor's GPUs hold the model with room for vLLM's KV cache? None: the size is unknown."""
    if size.weights_bytes is None:
        return None
    return size.weights_bytes <= FIT_FRACTION * flavor.memory_gb * 1e9


def needs_gb(size: ModelSize) -> float | None:
    """The GPU memory (GB) a flavor needs for this model, by the fit rule."""
    return None if size.weights_bytes is None else size.weights_bytes / FIT_FRACTION / 1e9


def prior_tokens_per_second(flavor: Flavor, size: ModelSize) -> tuple[float | None, str]:
    """(aggregate tokens/s, basis) for the model on this flavor from the priors; None when no prior fits."""
    if flavor.gpu is None or flavor.gpus == 0:
        return None, f"{flavor.name} has no GPU"
    prior = GPU_PRIORS.get(flavor.gpu)
    if prior is None:
        return None, f"no throughput prior for {flavor.gpu} GPUs"
    tps, source = prior
    weights = size.weights_bytes or REFERENCE_BYTES
    scale = min(4.0, REFERENCE_BYTES / weights)
    gpus = 1 + 0.8 * (flavor.gpus - 1)
    basis = (f"prior: {flavor.gpu} {tps:,.0f} tokens/s for an 8B BF16 model ({source}), x{scale:.2g} for "
             f"{weights / 1e9:.3g} GB of weights" + (f", x{gpus:.2g} for {flavor.gpus} GPUs" if flavor.gpus > 1 else "")
             + ("" if size.weights_bytes else " (size unknown: an 8B BF16 model assumed)"))
    return tps * scale * gpus, basis


def startup_seconds(size: ModelSize, *, pull: bool = True) -> float:
    """Image pull (Jobs only) + weights download and load + engine start."""
    weights = size.weights_bytes if size.weights_bytes is not None else REFERENCE_BYTES
    return (IMAGE_PULL_SECONDS if pull else 0.0) + weights / WEIGHTS_BYTES_PER_SECOND + ENGINE_INIT_SECONDS


# -- measurements ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Measured:
    tokens: int
    seconds: float  # generating (the runner's own progress clock), summed over runs
    startup_seconds: float  # the last run's time before its first answer
    runs: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _measured_path() -> Any:
    return home() / MEASURED_FILE


def measured(flavor: str, model: str) -> Measured | None:
    """What earlier runs of `model` on `flavor` ("local" for --engine vllm) measured, if any."""
    try:
        obj = read_json(_measured_path())
    except (OSError, ValueError):
        return None
    if not isinstance(obj, dict) or int(obj.get("schema", 1)) > MEASURED_SCHEMA:
        return None
    row = (obj.get("runs") or {}).get(f"{flavor}|{model}")
    if not isinstance(row, dict):
        return None
    try:
        return Measured(int(row["tokens"]), float(row["seconds"]), float(row["startup_seconds"]), int(row["runs"]))
    except (KeyError, TypeError, ValueError):
        return None


def record(flavor: str, model: str, tokens: int, seconds: float, startup: float) -> None:
    """Add one finished run's figures (atomic JSON, 0600). A newer file's schema is left alone."""
    if tokens <= 0 or seconds <= 0:
        return
    path = _measured_path()
    try:
        obj = read_json(path)
    except (OSError, ValueError):
        obj = {}
    if not isinstance(obj, dict):
        obj = {}
    if int(obj.get("schema", 1)) > MEASURED_SCHEMA:
        return
    runs = obj.setdefault("runs", {})
    row = runs.get(f"{flavor}|{model}") or {"tokens": 0, "seconds": 0.0, "runs": 0}
    row.update(tokens=int(row.get("tokens", 0)) + tokens, seconds=float(row.get("seconds", 0.0)) + seconds,
               runs=int(row.get("runs", 0)) + 1, startup_seconds=round(max(0.0, startup), 1),
               updated_at=int(time.time()))
    runs[f"{flavor}|{model}"] = row
    obj["schema"] = MEASURED_SCHEMA
    try:
        write_json(path, obj)
    except OSError:
        pass  # a measurement is a nicety: never a reason to fail a run


@dataclass(frozen=True, slots=True)
class RunEstimate:
    """Minutes of one vLLM run (one model on one flavor)."""

    startup_seconds: float
    generate_seconds: float | None
    basis: str

    @property
    def minutes(self) -> float | None:
        if self.generate_seconds is None:
            return None
        return (self.startup_seconds + self.generate_seconds) / 60


def estimate_run(flavor: Flavor, model: str, size: ModelSize, tokens: int, *, pull: bool = True) -> RunEstimate:
    """Start-up + tokens / throughput, from this machine's measurements of (flavor, model) when there are any."""
    m = measured(flavor.name, model)
    if m is not None and m.tokens_per_second > 0:
        return RunEstimate(m.startup_seconds, tokens / m.tokens_per_second,
                           f"measured: {m.tokens_per_second:,.0f} tokens/s over {m.runs} earlier run(s) of this "
                           "model on this flavor")
    tps, basis = prior_tokens_per_second(flavor, size)
    return RunEstimate(startup_seconds(size, pull=pull), tokens / tps if tps else None, basis)


def billed_minutes(seconds: float) -> int:
    """Jobs bill by the minute: a started minute counts (an assumption: the Hub does not document rounding)."""
    return max(1, math.ceil(seconds / 60)) if seconds > 0 else 0


# -- the cost report of a run on GPUs -----------------------------------------------------------------


@dataclass(slots=True)
class _Run:
    flavor: str
    seconds: float
    usd_per_minute: float | None
    billed_minutes: int | None  # Jobs: whole minutes; None: time x price (local GPU)


@dataclass
class GpuCost:
    """What a batch's GPU time cost (stats.cost, summary.CostReport): per run (a part's vLLM process or Job),
    its seconds x its price. Runs without a price make the total unknown (None) and say why in `notes`."""

    basis: str  # "gpu_time" (your GPU, --gpu-price) or "jobs_billing" (Hugging Face Jobs)
    runs: dict[str, _Run] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def set(self, key: str, flavor: str, seconds: float, usd_per_minute: float | None, *,
            billed: bool = False) -> None:
        self.runs[key] = _Run(flavor, max(0.0, seconds), usd_per_minute,
                              billed_minutes(seconds) if billed else None)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def _cost(self, r: _Run) -> float | None:
        if r.usd_per_minute is None:
            return None
        minutes = r.billed_minutes if r.billed_minutes is not None else r.seconds / 60
        return minutes * r.usd_per_minute

    @property
    def spent(self) -> float:
        return sum(c for r in self.runs.values() if (c := self._cost(r)) is not None)

    def summary(self) -> dict[str, Any]:
        costs = {k: self._cost(r) for k, r in self.runs.items()}
        known = all(c is not None for c in costs.values())
        return {
            "estimated_cost_usd": round(self.spent, 6) if known else None,
            "currency": "USD", "is_estimate": True, "basis": self.basis,
            "gpu_seconds": round(sum(r.seconds for r in self.runs.values()), 1),
            "runs": {k: {"flavor": r.flavor, "seconds": round(r.seconds, 1), "billed_minutes": r.billed_minutes,
                         "usd_per_hour": None if r.usd_per_minute is None else round(r.usd_per_minute * 60, 6),
                         "cost_usd": None if costs[k] is None else round(costs[k] or 0.0, 6)}
                     for k, r in self.runs.items()},
            "notes": list(self.notes),
        }


def parse_flavors(text: str | None) -> list[str] | None:
    """--flavors a,b,c -> names (None: every GPU flavor)."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError("--flavors: give flavor names separated by commas, such as l4x1,a100-large")
    return names
