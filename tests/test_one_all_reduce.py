"""PT332 in the engine: Falcon's parallel attention and MLP all-reduced once per layer, as vLLM's
own Falcon does, and still equal to HF at TP=2 in every config layout, with biases and without.

The committed port (generated/vllm/falcon) runs under `porter verify --tiny` (the tiny config with
the layout's fields overridden): the unreduced projections skip their biases, which the layer adds
once after the reduce; a layer whose blocks are sequential keeps a reduce in each projection.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import libcst as cst
import libcst.matchers as m
import pytest

from porter.analysis.cstutil import find_method, findall

ROOT = Path(__file__).resolve().parents[1]
PORT = ROOT / "generated" / "vllm" / "falcon"


def test_the_port_reduces_the_parallel_sum_once():
    module = cst.parse_module((PORT / "porter_vllm_falcon" / "modeling_falcon.py").read_text())
    classes = {c.name.value: c for c in module.body if isinstance(c, cst.ClassDef)}
    forward = find_method(classes["FalconDecoderLayer"], "forward")
    assert len(findall(forward, m.Call(func=m.Name("tensor_model_parallel_all_reduce")))) == 1
    for block in ("FalconAttention", "FalconMLP"):
        keywords = {
            a.keyword.value
            for call in findall(classes[block], m.Call(func=m.Name("RowParallelLinear")))
            for a in call.args  # type: ignore[attr-defined]
            if a.keyword is not None
        }
        assert {"reduce_results", "skip_bias_add"} <= keywords, block


@pytest.mark.e2e
@pytest.mark.parametrize(
    "layout",
    [
        # falcon-40b/180b: new decoder architecture, parallel blocks (one reduce), with biases
        {"bias": "true"},
        # falcon-7b: parallel blocks, multi-query, with biases
        {"new_decoder_architecture": "false", "multi_query": "true", "parallel_attn": "true", "bias": "true"},
        # falcon-rw: sequential blocks (a reduce in each projection), with biases
        {"new_decoder_architecture": "false", "multi_query": "false", "parallel_attn": "false",
         "num_kv_heads": "4", "bias": "true"},
    ],
)
def test_every_layout_equals_hf_at_tp_2(layout):
    tiny = [a for k, v in layout.items() for a in ("--tiny", f"{k}={v}")]
    run = subprocess.run(
        [sys.executable, "-m", "porter", "verify", str(PORT), "--tp", "2", "--json", *tiny],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, check=False, timeout=900,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(run.stdout)
    comparison = report["results"][0]["port"]["comparison"]
    worst = max(comparison["max_delta_prompt"], comparison["max_delta_decode"])
    print(layout, f"TP=2 max |Δ| {worst:.2e}")
    assert report["passed"] and worst <= report["threshold"] == 1e-4
