"""Issue 6: where vLLM 0.32 has its own model file, the port's parameter tree equals it.

One subprocess builds each port and vLLM's native class in-process on the same tiny checkpoint
(porter.verify.structure): names and shapes equal, load_weights fills every parameter, and every
loaded tensor equals what the native class loads. opt/llama/mistral/qwen2 are covered, for both
engines, by tests/test_structure_engines.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# committed ports whose architecture vLLM 0.32 implements natively (registry: _TEXT_GENERATION_MODELS)
NATIVE = ["qwen3", "granite", "stablelm", "gemma", "phi3", "nemotron", "gpt2", "bloom", "gptj", "falcon",
          "gemma3", "ernie4_5", "glm4", "hyperclovax", "cohere2", "exaone4", "cohere", "gemma2"]


# mixture-of-experts ports (issue 10): the router is a GateLinear (`gate.weight`), the experts one
# FusedMoE (`experts.routed_experts.w13_weight` / `w2_weight`), in both engines
MOE = ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "granitemoe", "granitemoeshared"]


def _check_trees(target: str, models: list[str]) -> None:
    dirs = [str(ROOT / "generated" / target / m) for m in models]
    proc = subprocess.run([sys.executable, "-m", "porter.verify.structure", *dirs, "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=1200)
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert len(reports) == len(models), proc.stderr[-3000:]
    for r in reports:
        assert r["native_class"] and r["native_class"].startswith(f"{target}.model_executor.models."), r
        assert r["params_equal"] is True, (r["only_in_port"], r["only_in_native"], r["shape_mismatch"])
        assert r["port_params"] == r["native_params"] > 0
        assert r["port_load"]["not_returned"] == [] and r["port_load"]["unwritten"] == {}
        assert r["tensors_equal"] is True and r["tensors_compared"] == r["port_params"], r["tensors_differ"]
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.e2e
def test_port_trees_equal_vllm_native():
    _check_trees("vllm", NATIVE)


@pytest.mark.e2e
@pytest.mark.parametrize("target", ["vllm", "aphrodite"])
def test_moe_port_trees_equal_native(target):
    _check_trees(target, MOE)
