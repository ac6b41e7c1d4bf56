"""The Ray driver's merge: shard files -> the batch's output and error files, and the workers' cost reports -> one.

Merger: the complete lines each shard's files gained since the last look, appended to -o/-e as they are (raw
bytes: the provider's body and the worker's line id pass through), each custom_id once. A line whose custom_id
already has one (in the batch's files when the run started, or merged before) is skipped: an attempt fenced too
late, or an earlier run's shard merged again, never writes a second line. Its counts go into the run's Stats.

ClusterCost: the Batch object's hfbatch.cost for a Ray run: the previous runs' report plus each shard attempt's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from ..errors import DependencyChanged
from ..fingerprints import IdSet
from .base import Work
from .vllm_store import OutputTail


class Merger:
    """Shard files -> -o/-e, each custom_id once (see the module docstring)."""

    def __init__(self, work: Work) -> None:
        self.work = work
        self.merged = IdSet()  # custom_ids merged by this run
        self.skipped = 0  # lines of a custom_id that had one already
        self.tails: dict[str, tuple[OutputTail, OutputTail]] = {}

    def take(self, shard: str, folder: Path) -> tuple[int, int]:
        """Merge what the shard's files gained; (output lines, error lines) merged now."""
        tails = self.tails.get(shard)
        if tails is None:
            tails = self.tails[shard] = (OutputTail(folder / "output.jsonl"), OutputTail(folder / "errors.jsonl"))
        answers, stats = self.work.answers, self.work.stats
        got = [0, 0]
        for i, (tail, sink) in enumerate(((tails[0], answers.out), (tails[1], answers.err))):
            for raw in tail.read():
                obj = self._line(raw, tail.path)
                cid = obj["custom_id"]
                if cid in self.work.answered or cid in self.merged:
                    self.skipped += 1
                    continue
                self.merged.add(cid)
                sink.write(raw)
                got[i] += 1
                if i == 0:
                    stats.completed += 1
                    resp = obj.get("response")
                    stats.add_usage(resp.get("body") if isinstance(resp, dict) else None)
                else:
                    stats.failed += 1
        return got[0], got[1]

    @staticmethod
    def _line(raw: bytes, path: Path) -> dict[str, Any]:
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str):
            raise DependencyChanged(f"{path}: not a batch line ({raw[:120]!r}): a shard file was damaged; the batch "
                                    "is resumable once that file is removed")
        return obj


class ClusterCost:
    """hfbatch.cost of a Ray run: the stored report of earlier runs plus the latest report of each shard attempt
    (token prices per model and provider, or GPU time), summed."""

    def __init__(self, before: dict[str, Any] | None) -> None:
        self.before = before
        self.shards: dict[str, dict[str, Any]] = {}  # "s0001.1" (shard.attempt) -> its summary()

    def _parts(self) -> list[dict[str, Any]]:
        return [p for p in (self.before, *self.shards.values()) if p]

    @property
    def spent(self) -> float:
        return sum(float(p.get("estimated_cost_usd") or 0.0) for p in self._parts())

    def summary(self) -> dict[str, Any]:
        parts = self._parts()
        if not parts:
            return {"estimated_cost_usd": 0.0, "currency": "USD", "is_estimate": True, "by_model": {},
                    "unpriced_requests": 0, "notes": []}
        out = dict(parts[-1])
        known = [p.get("estimated_cost_usd") for p in parts]
        out["estimated_cost_usd"] = (None if all(k is None for k in known)
                                     else round(sum(float(k or 0.0) for k in known), 10))
        by_model: dict[str, dict[str, dict[str, Any]]] = {}
        for p in parts:
            for model, provs in (p.get("by_model") or {}).items():
                for prov, r in provs.items():
                    row = by_model.setdefault(model, {}).setdefault(
                        prov, {"requests": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0})
                    for k in ("requests", "input_tokens", "output_tokens"):
                        row[k] += int(r.get(k) or 0)
                    row["cost_usd"] = (None if row["cost_usd"] is None or r.get("cost_usd") is None
                                       else round(row["cost_usd"] + float(r["cost_usd"]), 10))
        if by_model or "by_model" in out:
            out["by_model"] = by_model
        if "unpriced_requests" in out:
            out["unpriced_requests"] = sum(int(p.get("unpriced_requests") or 0) for p in parts)
        if "savings" in out:
            out["savings"] = {k: round(sum(float((p.get("savings") or {}).get(k) or 0.0) for p in parts), 10)
                              for k in out["savings"]}
        if "runs" in out:  # GPU time: every attempt's runs
            out["runs"] = {f"{i}:{k}": v for i, p in enumerate(parts) for k, v in (p.get("runs") or {}).items()}
            out["gpu_seconds"] = round(sum(float(p.get("gpu_seconds") or 0.0) for p in parts), 1)
        notes: list[str] = []
        for p in parts:
            notes.extend(n for n in p.get("notes") or [] if n not in notes)
        out["notes"] = notes
        return out
