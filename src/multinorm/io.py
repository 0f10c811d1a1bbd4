"""Small file and command-line helpers shared by the package: atomic writes and KEY=VALUE settings.

No library covers these two: the standard library has no atomic replace-write, and argparse has no
KEY=VALUE type with typed values.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["atomic_write", "parse_assignment"]


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], Any]) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename.

    ``data`` is bytes, text (written as UTF-8) or a function that writes to an open binary file (e.g.
    ``lambda f: torch.save(obj, f)``). A process killed mid-write leaves the old file intact (and at most
    a stray ``<name>.tmp``, which the next write replaces).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"KEY=VALUE"`` -> ``(key, value)``: the value is read as JSON (numbers, booleans, lists, null) and
    kept as a string otherwise; dashes in the key become underscores (``adam-lr=1e-3`` -> ``adam_lr``).

    Raises ValueError (an ``argparse.ArgumentTypeError``) without ``=``, so it can serve as an argparse type.
    """
    import argparse

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip().replace("-", "_"), parsed
