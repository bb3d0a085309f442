"""What every part of the sweep shares: file names, targets and TPs, the day-zero releases, and
package lookups that find a package without importing it."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

from porter.rules_data import COVERAGE_RULES, day_zero_releases  # noqa: F401  (re-exported)

ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = ROOT / ".porter-cache" / "coverage"
COVERAGE_MD = "COVERAGE.md"
COVERAGE_JSON = "COVERAGE.json"
TARGETS = ("vllm", "aphrodite")
TPS = (1, 2)
SCHEMA = 1

Log = Callable[[str], None]


def first_line(text: str, pattern: re.Pattern[str] | str) -> int | None:
    m = pattern.search(text) if isinstance(pattern, re.Pattern) else re.search(pattern, text, re.M)
    return text.count("\n", 0, m.start()) + 1 if m else None


def package_dir(name: str) -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec(name)  # finds the package; does not execute it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def dist_version(*names: str) -> str:
    import importlib.metadata

    for n in names:
        try:
            return importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def progress(total: int, label: str):
    """A rich progress bar on a TTY; a no-op elsewhere. Yields advance(description)."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        if not sys.stderr.isatty():
            yield lambda desc=None, advance=1: None
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=Console(stderr=True), transient=False) as prog:
            task = prog.add_task(label, total=total)

            def step(desc=None, advance=1):
                prog.update(task, advance=advance, description=f"{label} {desc}" if desc else label)

            yield step

    return cm()
