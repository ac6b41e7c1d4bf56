"""pyarrow, imported on first use: a missing `data` extra is a one-line usage error (exit 2), not a traceback."""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

from ..errors import UsageError

INSTALL_HINT = 'pip install "hfbatch[data]"'


def install_hint() -> str:
    """How to add pyarrow where hfbatch runs: the extra, or, inside the venv `hf extensions install` made for
    `hf batch`, that venv's own interpreter (it may have no pip when uv created it)."""
    if f"{os.sep}hf{os.sep}extensions{os.sep}" in sys.prefix:
        return (f'{INSTALL_HINT} into the hf batch extension\'s environment: {sys.executable} -m pip install pyarrow '
                f"(or uv pip install --python {sys.executable} pyarrow)")
    return INSTALL_HINT


def pyarrow(module: str = "") -> ModuleType:
    """`pyarrow` or one of its modules ("parquet", "csv"), or UsageError naming the extra to install."""
    name = "pyarrow" + (f".{module}" if module else "")
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise UsageError(f"reading and writing datasets needs pyarrow, which is not installed: {install_hint()} "
                         f"({e})") from None
