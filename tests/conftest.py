from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "generated"
# every architecture with a committed port (generated/vllm/<model_type>)
MODELS = sorted(p.name for p in (GENERATED / "vllm").iterdir() if (p / "PORT.json").exists())
TARGETS = ["vllm", "aphrodite"]


def run_porter(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the porter CLI as a user would (a fresh process)."""
    return subprocess.run(
        [sys.executable, "-m", "porter", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


@pytest.fixture
def porter_cli():
    return run_porter
