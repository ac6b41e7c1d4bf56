"""pyarrow, imported on first use: a missing `data` extra is a one-line usage error (exit 2), not a traceback."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import UsageError

INSTALL_HINT = 'pip install "hfbatch[data]"'


def pyarrow(module: str = "") -> ModuleType:
    """`pyarrow` or one of its modules ("parquet", "csv"), or UsageError naming the extra to install."""
    name = "pyarrow" + (f".{module}" if module else "")
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise UsageError(f"reading and writing datasets needs pyarrow, which is not installed: {INSTALL_HINT} "
                         f"({e})") from None
