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
        # every parameter written; the names load_weights returns are the native class's (Aphrodite's
        # FusedMoE reports its experts without the `routed_experts` level, native and port alike)
        assert r["port_load"]["unwritten"] == {}
        assert r["port_load"]["not_returned"] == r["native_load"]["not_returned"], r["port_load"]
        assert r["port_load"]["unknown_returned"] == r["native_load"]["unknown_returned"], r["port_load"]
        assert r["tensors_equal"] is True and r["tensors_compared"] == r["port_params"], r["tensors_differ"]
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.e2e
def test_port_trees_equal_vllm_native():
    _check_trees("vllm", NATIVE)


@pytest.mark.e2e
@pytest.mark.parametrize("target", ["vllm", "aphrodite"])
def test_moe_port_trees_equal_native(target):
    _check_trees(target, MOE)


_GEMMA4_UNIFIED = """
import json, sys, tempfile
from pathlib import Path
from porter.verify.structure import compare_structure, find_port_class, make_checkpoint
if __name__ == "__main__":
    info, cls = find_port_class(Path("generated/vllm/gemma4_unified"))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint("gemma4_unified", Path(tmp) / "ckpt", hf_architecture=info.hf_architecture)
        r = compare_structure("vllm", ckpt, cls, "Gemma4ForCausalLM")
    print(json.dumps({k: r.__dict__[k] for k in ("native_class", "params_equal", "port_params", "native_params",
                                                 "tensors_equal", "tensors_compared", "errors")}))
"""


@pytest.mark.e2e
def test_gemma4_unified_tree_equals_vllm_gemma4():
    """Issue 25: vLLM serves Gemma4UnifiedForCausalLM only inside its multimodal class, and its text stack
    is vLLM's gemma4: the port (KV-shared layers with q_proj alone, v rows loaded from k_proj) builds the
    same parameters on the tiny gemma4_unified checkpoint, and loads the same tensors into them."""
    proc = subprocess.run([sys.executable, "-c", _GEMMA4_UNIFIED], capture_output=True, text=True, cwd=ROOT,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["native_class"] == "vllm.model_executor.models.gemma4:Gemma4ForCausalLM", r
    assert r["params_equal"] is True and r["port_params"] == r["native_params"] == 41, r
    assert r["tensors_equal"] is True and r["tensors_compared"] == 41 and r["errors"] == [], r
