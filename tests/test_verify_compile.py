"""End to end: a port runs compiled (vLLM without enforce_eager: inductor compiles the base model
that rule PT052 decorates with @support_torch_compile) and still matches HF."""

from __future__ import annotations

from pathlib import Path

import pytest

from porter.layout import PortInfo
from porter.verify import THRESHOLD, render_report, run_verify

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e


def test_llama_port_compiled_matches_hf():
    port_dir = ROOT / "generated" / "vllm" / "llama"
    info = PortInfo.load(port_dir)
    assert any(r.startswith("PT052") for r in info.rules_applied)
    assert "@support_torch_compile(" in (port_dir / f"{info.module.replace('.', '/')}.py").read_text()
    report = run_verify(port_dir, tps=[1], compiled=True)
    text = render_report(report, json=False)
    assert report.exit_code == 0, text
    (r,) = report.results
    assert r.port.comparison is not None and r.port.comparison.max_delta <= THRESHOLD, text
    assert r.port.comparison.tokens_equal and r.class_ok, text
    assert r.port.compilation_mode not in (None, "NONE"), r.port.compilation_mode  # really compiled
