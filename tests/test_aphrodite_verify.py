"""Issue 9: `porter verify <m> --target aphrodite --json` on the committed Aphrodite ports, in
the real aphrodite-engine package (no forward pass: its wheel has no CPU kernels).

Each run is the CLI in a fresh process, as a user would run it. Measured on this 2-core machine
(load ~4 from other work): 15-31 s per model, the file 160 s. One process for all four ports
(`python -m porter.verify.structure DIR...`) saves little (57 s against ~70 s for the four
CLI runs at the same load): each port's plugin check needs its own fresh Aphrodite process.
"""

from __future__ import annotations

import json
import shutil

import libcst as cst
import pytest

from conftest import GENERATED, run_porter
from porter.layout import PortInfo

MODELS = ["opt", "llama", "mistral", "qwen2"]
# Parameters of the tiny checkpoint each port is checked with (rules/tiny_configs.yaml): what Aphrodite's
# own port builds for the same config.
EXPECTED_PARAMS = {"opt": 30, "llama": 15, "mistral": 15, "qwen2": 17}
MISSING_INTERFACES = {"opt": ["pp"]}


def verify_aphrodite(port: str):
    proc = run_porter("verify", port, "--target", "aphrodite", "--json")
    report = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc, report


@pytest.mark.e2e
@pytest.mark.parametrize("model", MODELS)
def test_committed_port_passes_against_aphrodite(model):
    info = PortInfo.load(GENERATED / "aphrodite" / model)
    proc, r = verify_aphrodite(model)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert r["ok"] and r["target"] == "aphrodite" and r["errors"] == []

    # parameter trees equal Aphrodite's own class for the same config
    assert r["native_class"].startswith("aphrodite.model_executor.models."), r["native_class"]
    assert r["native_class"].endswith(f":{info.hf_architecture}")
    assert r["params_equal"] is True
    assert r["port_params"] == r["native_params"] == EXPECTED_PARAMS[model]
    assert r["only_in_port"] == r["only_in_native"] == [] and r["shape_mismatch"] == {}

    # the engine's interfaces Aphrodite's own class has (pipeline parallel, LoRA, EAGLE-3): the port's
    # too, but OPT's pipeline stages (its layers sit one level deeper, under model.decoder: PT320
    # does not stage them), which the report names
    assert r["interfaces_missing"] == MISSING_INTERFACES.get(model, []), r["interfaces_missing"]
    assert set(r["native_interfaces"]) - set(r["port_interfaces"]) == set(r["interfaces_missing"])
    assert ("pp" in r["port_interfaces"]) is (model != "opt"), r["port_interfaces"]

    # load_weights fills every parameter (NaN probe) and returns every name
    load = r["port_load"]
    assert load["error"] is None and not load["returned_none"]
    assert load["not_returned"] == [] and load["unwritten"] == {}
    assert load["returned"] == r["port_params"]

    # every loaded tensor equals the one Aphrodite's own class loads
    assert r["tensors_equal"] is True and r["tensors_differ"] == {}
    assert r["tensors_compared"] == r["port_params"]

    # the port imports under Aphrodite, without vLLM
    imp = r["port_import"]
    assert imp["ok"] and imp["module"] == info.module and imp["vllm_imports"] == []

    # Aphrodite's own plugin loader finds the entry point and it registers the port's class
    p = r["plugin"]
    assert p["group"] == "aphrodite.general_plugins" == info.plugin_group
    assert p["loader"] == "aphrodite.plugins:load_general_plugins"
    assert p["error"] is None
    assert p["found"] and info.package in p["loaded_by_loader"]
    assert p["architecture"] == info.architecture
    assert not p["registered_before"] and p["registered"]
    assert p["resolved_class"] == p["expected_class"] == r["port_class"]
    assert r["port_class"].startswith(f"{info.module}:")

    # the report says plainly that no forward pass ran, and why
    assert r["forward_run"] is False
    why = r["forward_not_run_because"]
    assert why and why.startswith("forward not run") and "CPU attention kernels" in why
    assert "Triton" in why and why in r["notes"]


class _SwapKV(cst.CSTTransformer):
    """In the port's WeightsMapper only: the shard ids "k" and "v" of the stacked mapping trade places."""

    def __init__(self):
        self.depth = 0
        self.swapped = 0

    @staticmethod
    def _mapper(node) -> bool:
        return any(isinstance(t.target, cst.Name) and t.target.value.endswith("_mapper") for t in node.targets)

    def visit_Assign(self, node):
        if self._mapper(node):
            self.depth += 1

    def leave_Assign(self, original, updated):
        if self._mapper(original):
            self.depth -= 1
        return updated

    def leave_SimpleString(self, original, updated):
        if self.depth and original.evaluated_value in ("k", "v"):
            self.swapped += 1
            other = "v" if original.evaluated_value == "k" else "k"
            return updated.with_changes(value=f'"{other}"')
        return updated


@pytest.mark.e2e
def test_port_with_k_and_v_swapped_fails_naming_the_tensor(tmp_path):
    port = tmp_path / "llama"
    shutil.copytree(GENERATED / "aphrodite" / "llama", port)
    info = PortInfo.load(port)
    modeling = port / (info.module.replace(".", "/") + ".py")
    swap = _SwapKV()
    modeling.write_text(cst.parse_module(modeling.read_text()).visit(swap).code)
    assert swap.swapped == 2, f"expected one 'k' and one 'v' shard id in {modeling}"

    proc, r = verify_aphrodite(str(port))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert not r["ok"]
    # structure and fill are unchanged: only the values tell
    assert r["params_equal"] is True and r["port_load"]["unwritten"] == {}
    assert r["tensors_equal"] is False
    differ = set(r["tensors_differ"])
    assert differ == {f"model.layers.{i}.self_attn.qkv_proj.weight" for i in range(2)}, differ
    # the plugin of the mutated copy is what the loader registered, and it was the one checked
    assert r["plugin"]["found"] and r["plugin"]["resolved_class"] == r["port_class"]

    # the plain report names the differing tensor too
    text = run_porter("verify", str(port), "--target", "aphrodite")
    assert text.returncode == 1
    assert "model.layers.0.self_attn.qkv_proj.weight" in text.stdout
