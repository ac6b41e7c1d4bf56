"""docs/architecture.md stays true to the tree: every module it names exists, every top-level module and
subpackage appears in it, and every name it gives a subpackage's module or class is there."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "hfbatch"
DOC = (ROOT / "docs" / "architecture.md").read_text()
SUBPACKAGES = sorted(p.parent.name for p in PKG.glob("*/__init__.py"))


def test_every_top_level_module_and_subpackage_is_on_the_map() -> None:
    missing = [f"{p.name}" for p in sorted(PKG.glob("*.py")) if p.name != "__init__.py" and p.name not in DOC]
    missing += [f"{name}/" for name in SUBPACKAGES if f"{name}/" not in DOC]
    assert not missing, f"docs/architecture.md does not name {missing}"


def test_every_file_the_map_names_exists() -> None:
    sub = "|".join(SUBPACKAGES)
    named = set(re.findall(rf"\b((?:(?:{sub}|tests)/)?[a-z_]+\.py)\b", DOC))
    assert named
    gone = [n for n in sorted(named) if not (PKG / n).exists() and not (ROOT / n).exists() and not list(PKG.rglob(n))]
    assert not gone, f"docs/architecture.md names files that do not exist: {gone}"


@pytest.mark.parametrize("ref", sorted(set(re.findall(
    r"`((?:batches|engines|http|cost|serve|cli|testing|data|limits|writer|models|config)\.[A-Za-z_.]+)", DOC))))
def test_every_dotted_name_resolves(ref: str) -> None:
    """`engines.base.Engine`, `limits.Capacity`...: a module, then attributes."""
    parts = ref.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module("hfbatch." + ".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            assert hasattr(obj, attr), f"docs/architecture.md names {ref}: no {attr} in {obj!r}"
            obj = getattr(obj, attr)
        return
    pytest.fail(f"docs/architecture.md names {ref}: no such module")
