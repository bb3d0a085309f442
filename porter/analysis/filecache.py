"""Python files porter reads as data (transformers' conversion mapping, the engine's auto tables):
parsed with `ast`, never imported, and read once per process and version of the file."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_CACHE: dict[tuple, object] = {}


def derived(path: Path, derive: Callable[[ast.Module], T], empty: T) -> T:
    """`derive(ast of path)`, computed once per (derive, path, mtime, size); `empty` when the
    file is missing or does not parse."""
    try:
        st = path.stat()
    except OSError:
        return empty
    key = (derive, path, st.st_mtime_ns, st.st_size)
    if key not in _CACHE:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            _CACHE[key] = empty
        else:
            _CACHE[key] = derive(tree)
    return _CACHE[key]  # type: ignore[return-value]
