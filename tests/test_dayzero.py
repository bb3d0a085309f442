"""Day-zero ports: a model type newer than the engine's transformers (issue 11).

`porter convert MODEL --transformers 5.24.0` reads that release's wheel statically and ships the
config class, rewritten to import under the installed transformers, registered with AutoConfig by
the plugin. The engine-side verify of such a port (HF reference from the release's own venv) runs
in tests/test_verify_harness.py with every committed port.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_porter
from porter.config_port import engine_has
from porter.passes.config._common import ConfigContext
from porter.passes.config.config_engine_imports import ConfigEngineImports
from porter.passes.config.config_keep_class import ConfigKeepClass
from porter.errors import PorterError
from porter.source import transformers_root

RELEASE = "5.24.0"


@pytest.fixture(scope="module")
def apertus(tmp_path_factory):
    out = tmp_path_factory.mktemp("dz")
    proc = run_porter("convert", "apertus1p5", "--transformers", RELEASE, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_port_ships_the_config_and_registers_it(apertus):
    port = apertus / "vllm" / "apertus1p5"
    info = json.loads((port / "PORT.json").read_text())
    assert info["transformers_version"] == RELEASE
    assert info["config_class"] == "porter_vllm_apertus1p5.configuration_apertus1p5:Apertus1p5TextConfig"
    assert info["config_model_type"] == "apertus1p5_text"
    cfg = (port / "porter_vllm_apertus1p5" / "configuration_apertus1p5.py").read_text()
    # only the text config; relative imports made absolute; documentation decorators dropped
    assert "class Apertus1p5TextConfig(PreTrainedConfig)" in cfg
    assert "VisionTokenizerConfig" not in cfg and "AutoConfig" not in cfg
    assert "from ..." not in cfg and "auto_docstring" not in cfg
    # in a fresh process of the engine's environment: register() makes AutoConfig know the type
    code = (
        "import porter_vllm_apertus1p5 as p, transformers; p.register();"
        "c = transformers.AutoConfig.for_model('apertus1p5_text', hidden_size=64);"
        "print(type(c).__module__, type(c).__name__, c.hidden_act, transformers.__version__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=port, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["porter_vllm_apertus1p5.configuration_apertus1p5",
                                   "Apertus1p5TextConfig", "xielu", "5.19.0"]


def test_an_installed_model_type_ships_no_config(tmp_path):
    proc = run_porter("convert", "llama", "--out", str(tmp_path), "--target", "vllm")
    assert proc.returncode == 0, proc.stderr
    files = json.loads((tmp_path / "vllm" / "llama" / "PORT.json").read_text())["files"]
    assert not any("configuration_" in f for f in files)
    assert "config_class" not in json.loads((tmp_path / "vllm" / "llama" / "PORT.json").read_text())


def test_xielu_is_the_engine_class_and_its_buffers_load(apertus):
    text = (apertus / "vllm" / "apertus1p5" / "porter_vllm_apertus1p5" / "modeling_apertus1p5.py").read_text()
    assert "XIELU(dtype=config.dtype)" in text and "ACT2CLS" not in text
    # its beta/eps are buffers: the engine's AutoWeightsLoader loads a module's persistent buffers too
    assert "AutoWeightsLoader(self)" in text and "named_buffers" not in text
    # q/k norms are per head: split heads around them, flat outside
    assert "self.q_norm(query_states.unflatten(-1, (-1, self.head_dim))).flatten(-2)" in text


def test_engine_has_checks_the_installed_transformers_statically():
    root = transformers_root()
    assert engine_has(root, "transformers.configuration_utils", "PreTrainedConfig")
    assert engine_has(root, "transformers.utils", "auto_docstring")
    assert not engine_has(root, "transformers.configuration_utils", "NoSuchHelperInAnyRelease")
    assert engine_has(root, "huggingface_hub.dataclasses", "strict")  # not transformers' business


def test_a_newer_helper_the_engine_lacks_is_reported_with_its_line(tmp_path):
    from porter.config_port import ship_config
    from porter.source import Source

    models = tmp_path / "transformers" / "models" / "newlm"
    models.mkdir(parents=True)
    (models / "configuration_newlm.py").write_text(
        "from ...configuration_utils import PreTrainedConfig\n"
        "from ...utils.type_validators import helper_from_the_future\n\n\n"
        "class NewLmConfig(PreTrainedConfig):\n    model_type = \"newlm\"\n"
        "    size: int = helper_from_the_future(3)\n")
    model_text = "class NewLmForCausalLM(PreTrainedModel):\n    def __init__(self, config: NewLmConfig):\n        pass\n"
    src = Source(path=models / "modeling_newlm.py", text=model_text, sha256="0", model_type="newlm",
                 rel_path="models/newlm/modeling_newlm.py", transformers_version="9.9.9",
                 config_path=models / "configuration_newlm.py")
    with pytest.raises(PorterError) as exc:
        ship_config(src, "NewLmForCausalLM", transformers_root())
    line = exc.value.one_line()
    assert line.startswith(f"{models / 'configuration_newlm.py'}:2: ")
    assert "helper_from_the_future" in line and "config-engine-imports" in line


def test_config_rules_examples_are_registered():
    from porter.passes import REGISTRY

    assert REGISTRY["PT141"] is ConfigEngineImports and REGISTRY["PT142"] is ConfigKeepClass
    assert ConfigContext(keep={"A"}, engine_root=Path("/nonexistent")).problems == []


def _recorded(port: Path) -> str:
    """The transformers release a committed port was converted from (its PORT.json)."""
    return json.loads((port / "PORT.json").read_text())["transformers_version"]


def test_verify_of_a_day_zero_port_without_its_release_env_is_exit_2(tmp_path, monkeypatch):
    from porter.verify import run_verify

    monkeypatch.setenv("PORTER_HF_ENVS", str(tmp_path))  # no .venv-transformers-* there
    port = Path(__file__).resolve().parents[1] / "generated" / "vllm" / "exaone"
    release = _recorded(port)  # 5.24.0 (a newer one after the weekly regeneration)
    report = run_verify(port, [1])
    assert report.exit_code == 2
    assert f"transformers {release}" in report.reason and "make setup" in report.reason
    assert str(tmp_path / f".venv-transformers-{release}") in report.reason


def test_setup_builds_the_envs_the_committed_ports_need():
    from porter.source import installed_transformers_version
    from porter.verify.hfenv import versions_needed

    root = Path(__file__).resolve().parents[1] / "generated"
    # every release a committed vLLM port records (day-zero ports, generated/releases/<version>/),
    # read here from the PORT.json files themselves, less the installed one
    recorded = {json.loads(p.read_text())["transformers_version"]
                for p in [*root.glob("vllm/*/PORT.json"), *root.glob("releases/*/vllm/*/PORT.json")]}
    here = installed_transformers_version()
    assert recorded - {here}  # day-zero ports (all of them, after the weekly regeneration)
    assert versions_needed(root) == sorted(recorded - {here}, key=lambda v: tuple(map(int, v.split("."))))
    makefile = (root.parent / "Makefile").read_text()
    assert "$(BIN)/python -m porter.verify.hfenv generated" in makefile
    assert "test: $(TEST_STAMP) hf-envs" in makefile and "test-full: $(TEST_STAMP) hf-envs" in makefile


def test_release_env_requirements_come_from_the_wheel_less_the_runtime_probed_kernels():
    # transformers 5.25 requires kernels>=0.19.1,<0.20, which the package index here lacks:
    # its venv gets transformers with --no-deps and every other requirement resolved normally
    from porter.source import fetch_wheel
    from porter.verify.hfenv import RUNTIME_OPTIONAL, requirements

    reqs = requirements(fetch_wheel("5.25.0"))
    names = {r.split("<")[0].split(">")[0].split("=")[0].split("!")[0].strip() for r in reqs}
    assert "kernels" in RUNTIME_OPTIONAL and "kernels" not in names
    assert {"huggingface-hub", "tokenizers", "safetensors", "numpy"} <= names
    assert not any("extra" in r for r in reqs)


def test_aphrodite_structural_check_of_a_day_zero_port_is_one_line_exit_2():
    proc = run_porter("verify", "exaone", "--target", "aphrodite")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    release = _recorded(Path(__file__).resolve().parents[1] / "generated" / "aphrodite" / "exaone")
    assert f"ships the config of model type exaone (transformers {release})" in last


def test_flint_routes_with_sigmoids_and_shards_its_attention_sinks():
    # flint (5.24.0): a router ranking sigmoids of the logits (PT100, scoring_func) and attention
    # sinks `s_aux=self.sinks` (PT160: the engine's Attention(sinks=...), one value per head of
    # this rank, loaded as this rank's slice)
    port = Path(__file__).resolve().parents[1] / "generated" / "vllm" / "flint"
    info = json.loads((port / "PORT.json").read_text())
    from porter.rules_data import day_zero_releases

    assert info["transformers_version"] in day_zero_releases() and "PT160 attention-sinks" in info["rules_applied"]
    text = (port / "porter_vllm_flint" / "modeling_flint.py").read_text()
    import ast

    (moe_call,) = [n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Call)
                   and getattr(n.func, "id", None) == "FusedMoEFactory"]
    kw = {k.arg: ast.unparse(k.value) for k in moe_call.keywords}
    assert (kw["use_grouped_topk"], kw["num_expert_group"], kw["topk_group"]) == ("True", "1", "1")
    assert kw["scoring_func"] == "'sigmoid'" and kw["renormalize"] == "config.norm_topk_prob"
    assert "self.sinks.weight_loader = sharded_weight_loader(0)" in text
    assert "config.num_attention_heads // get_tensor_model_parallel_world_size()" in text
    assert "sinks=self.sinks," in text
    (moe,) = info["plan"]["moes"]
    assert moe["scoring_func"] == "sigmoid"
    # the other MoE ports (softmax routers) record no scoring: their PORT.json is unchanged
    mixtral = json.loads((port.parent / "mixtral" / "PORT.json").read_text())
    assert all("scoring_func" not in m for m in mixtral["plan"]["moes"])
