"""Structural checks in the real engines (vLLM 0.32 and Aphrodite 0.24), built in-process.

Engine state is per process and the two engines cannot share one, so each target gets one
worker subprocess (this file run as a script) that does all of that target's work and returns
JSON; the tests below only read it. The worker checks:

- porter's committed ports ``generated/<target>/<model_type>`` against the engine's native
  class: names and shapes equal, ``load_weights`` fills every parameter, loaded tensors equal;
- the checker itself, with the engine's own classes standing in for ports, and with broken
  stand-ins (a dropped shard, swapped k/v, an extra parameter) that it must catch.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import run_group

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["opt", "llama", "mistral", "qwen2"]
TARGETS = ["vllm", "aphrodite"]
NATIVE = {
    "opt": "OPTForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def port_dir(target: str, model_type: str) -> Path:
    return ROOT / "generated" / target / model_type


# ------------------------------------------------------------------------------------------
# The worker (runs in its own process: `python tests/test_structure_engines.py TARGET OUT`).


def _broken_stand_ins(native_cls):
    """Subclasses of the engine's class with one defect each (nothing copied: they only
    filter or rename what reaches the engine's own load_weights)."""
    import torch

    class DropsV(native_cls):
        def load_weights(self, weights):
            return super().load_weights((n, w) for n, w in weights if "v_proj" not in n)

    class SwapsKV(native_cls):
        def load_weights(self, weights):
            def swap(n):
                if "k_proj" in n:
                    return n.replace("k_proj", "v_proj")
                if "v_proj" in n:
                    return n.replace("v_proj", "k_proj")
                return n

            return super().load_weights((swap(n), w) for n, w in weights)

    class ExtraParam(native_cls):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.extra_scale = torch.nn.Parameter(torch.ones(3))

    return {"drops_v": DropsV, "swaps_kv": SwapsKV, "extra_param": ExtraParam}


def worker(target: str, out: Path) -> None:
    import tempfile

    from porter.verify import structure as S

    result: dict = {"ports": {}, "native": {}, "broken": {}}
    tmp = Path(tempfile.mkdtemp(prefix="porter-structure-test-"))
    checkpoints = {mt: S.make_checkpoint(mt, tmp / mt) for mt in MODELS}

    for mt in MODELS:
        d = port_dir(target, mt)
        if (d / "PORT.json").is_file():
            try:
                result["ports"][mt] = S.check_port(d, checkpoints[mt]).to_dict()
            except Exception as e:  # noqa: BLE001 (the test fails with it)
                result["ports"][mt] = {"ok": False, "errors": [f"{type(e).__name__}: {e}"]}

    for mt in MODELS:
        native_cls, why = S.resolve_native(target, checkpoints[mt], NATIVE[mt])
        assert native_cls is not None, why
        report = S.compare_structure(target, checkpoints[mt], native_cls, NATIVE[mt])
        result["native"][mt] = report.to_dict()

    llama_cls, _ = S.resolve_native(target, checkpoints["llama"], "LlamaForCausalLM")
    for name, cls in _broken_stand_ins(llama_cls).items():
        report = S.compare_structure(target, checkpoints["llama"], cls, "LlamaForCausalLM")
        result["broken"][name] = report.to_dict()

    # A checkpoint whose config.json names the port's own architecture (as verify writes it).
    porter_named = S.make_checkpoint("llama", tmp / "porter-named", architecture="PorterLlama")
    report = S.compare_structure(target, porter_named, llama_cls, "LlamaForCausalLM")
    result["porter_named"] = report.to_dict()

    out.write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------
# The tests.

_RESULTS: dict[str, dict] = {}


def results(target: str, tmp_path_factory) -> dict:
    if target not in _RESULTS:
        out = tmp_path_factory.mktemp(f"structure-{target}") / "result.json"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = run_group([sys.executable, __file__, target, str(out)], env=env, timeout=900)
        if proc.returncode != 0 or not out.exists():
            pytest.fail(f"{target} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        _RESULTS[target] = json.loads(out.read_text())
    return _RESULTS[target]


@pytest.mark.e2e
@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize("target", TARGETS)
def test_port_matches_native(target, model_type, tmp_path_factory):
    if not (port_dir(target, model_type) / "PORT.json").is_file():
        pytest.skip(f"generated/{target}/{model_type} is not committed yet")
    r = results(target, tmp_path_factory)["ports"][model_type]
    assert not r.get("errors"), r.get("errors")
    # Names and shapes equal the engine's native class.
    assert r["params_equal"] is True, (r["only_in_port"], r["only_in_native"], r["shape_mismatch"])
    assert r["port_params"] == r["native_params"] > 0
    # load_weights fills every parameter, and says so.
    load = r["port_load"]
    assert load["error"] is None
    assert not load["returned_none"]
    assert load["not_returned"] == []
    assert load["unwritten"] == {}
    # What it loaded is what the native class loads from the same checkpoint.
    assert r["tensors_equal"] is True, r["tensors_differ"]
    assert r["tensors_compared"] == r["port_params"]
    assert r["ok"] is True
    if target == "aphrodite":
        assert r["forward_run"] is False and any("forward not run" in n for n in r["notes"])


@pytest.mark.e2e
@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize("target", TARGETS)
def test_native_stand_in_passes(target, model_type, tmp_path_factory):
    r = results(target, tmp_path_factory)["native"][model_type]
    assert r["ok"] is True, r
    assert r["params_equal"] and r["tensors_equal"]
    assert r["port_load"]["returned"] == r["port_params"] > 0
    json.dumps(r)  # the report is plain JSON


@pytest.mark.e2e
@pytest.mark.parametrize("target", TARGETS)
def test_parameter_counts(target, tmp_path_factory):
    """The tiny configs' trees, as each engine builds them (issue 9 measured llama's 15)."""
    native = results(target, tmp_path_factory)["native"]
    # llama/mistral: embed, norm, lm_head + 6 per layer; qwen2 adds a fused q/k/v bias per
    # layer; opt: tied lm_head, learned positions, project_in/out, final norm, 12 per layer.
    counts = {mt: native[mt]["port_params"] for mt in MODELS}
    assert counts == {"llama": 15, "mistral": 15, "qwen2": 17, "opt": 30}


@pytest.mark.e2e
@pytest.mark.parametrize("target", TARGETS)
def test_dropped_shard_is_caught(target, tmp_path_factory):
    r = results(target, tmp_path_factory)["broken"]["drops_v"]
    assert not r["ok"]
    # q and k still reach qkv_proj, so the name is returned: only the NaN fill shows the hole.
    unwritten = r["port_load"]["unwritten"]
    assert sorted(unwritten) == [f"model.layers.{i}.self_attn.qkv_proj.weight" for i in (0, 1)]
    # v is 2 kv heads x 32 of q(128) + k(64) + v(64) rows.
    assert all(abs(f - 0.25) < 1e-6 for f in unwritten.values())


@pytest.mark.e2e
@pytest.mark.parametrize("target", TARGETS)
def test_swapped_shards_are_caught(target, tmp_path_factory):
    r = results(target, tmp_path_factory)["broken"]["swaps_kv"]
    # Every element written and every name returned: only the value comparison catches it.
    assert r["port_load"]["unwritten"] == {} and r["port_load"]["not_returned"] == []
    assert r["params_equal"] is True
    assert r["tensors_equal"] is False and not r["ok"]
    assert sorted(r["tensors_differ"]) == [
        f"model.layers.{i}.self_attn.qkv_proj.weight" for i in (0, 1)
    ]


@pytest.mark.e2e
@pytest.mark.parametrize("target", TARGETS)
def test_extra_parameter_is_caught(target, tmp_path_factory):
    r = results(target, tmp_path_factory)["broken"]["extra_param"]
    assert not r["ok"]
    assert r["only_in_port"] == ["extra_scale"] and r["only_in_native"] == []
    assert r["port_load"]["not_returned"] == ["extra_scale"]
    assert r["port_load"]["unwritten"] == {"extra_scale": 1.0}


@pytest.mark.e2e
@pytest.mark.parametrize("target", TARGETS)
def test_checkpoint_naming_the_port_architecture(target, tmp_path_factory):
    """config.json naming an architecture the engine does not know (the port's own name)."""
    r = results(target, tmp_path_factory)["porter_named"]
    assert r["ok"] is True, r


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
