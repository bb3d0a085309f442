"""`python -m porter.verify.structure PORT_DIR --json`, finding a port's class, tiny checkpoints.

The CLI runs are subprocesses (engine state is per process); the port directories here are
laid out like porter's, with a module whose class only subclasses the engine's own class.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from porter.layout import PortInfo, package_name, port_architecture
from porter.verify import structure as S

ROOT = Path(__file__).resolve().parents[1]


def fake_port(
    root: Path,
    target: str,
    model_type: str,
    hf_arch: str,
    module_text: str,
    class_name: str | None = None,
) -> Path:
    pkg = package_name(target, model_type)
    arch = port_architecture(hf_arch)
    d = root / target / model_type
    (d / pkg).mkdir(parents=True)
    module = f"{pkg}.modeling_{model_type}"
    (d / pkg / f"modeling_{model_type}.py").write_text(module_text)
    (d / pkg / "__init__.py").write_text(
        "def register():\n"
        f"    from {target} import ModelRegistry\n\n"
        f'    ModelRegistry.register_model("{arch}", "{module}:{class_name or arch}")\n'
    )
    info = PortInfo(
        target=target,
        model_type=model_type,
        architecture=arch,
        hf_architecture=hf_arch,
        package=pkg,
        module=module,
        plugin_group=f"{target}.general_plugins",
        source=f"models/{model_type}/modeling_{model_type}.py",
        transformers_version="0",
        source_sha256="0",
        porter_version="0",
    )
    (d / "PORT.json").write_text(info.to_json())
    return d


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "porter.verify.structure", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )


def test_find_port_class_uses_the_registered_name(tmp_path):
    d = fake_port(
        tmp_path,
        "vllm",
        "zzfake",
        "ZzFakeForCausalLM",
        "class ZzPort:\n    pass\n\nclass PorterZzFakeForCausalLM:\n    pass\n",
        class_name="ZzPort",
    )
    info, cls = S.find_port_class(d, prepare_engine=False)
    assert info.architecture == "PorterZzFakeForCausalLM"
    assert cls.__name__ == "ZzPort"  # what register() names wins over the convention


def test_find_port_class_falls_back_to_hf_name(tmp_path):
    d = fake_port(
        tmp_path,
        "vllm",
        "zzfake2",
        "Zz2ForCausalLM",
        "class Zz2ForCausalLM:\n    pass\n",
        class_name="Missing",
    )
    _, cls = S.find_port_class(d, prepare_engine=False)
    assert cls.__name__ == "Zz2ForCausalLM"


def test_not_a_port_dir_is_bad_input(tmp_path):
    with pytest.raises(S.StructureInputError):
        S.find_port_class(tmp_path, prepare_engine=False)
    proc = run_cli(str(tmp_path), "--json")
    assert proc.returncode == 2 and "PORT.json" in proc.stderr


def test_tiny_checkpoint(tmp_path):
    ckpt = S.make_checkpoint("qwen2", tmp_path / "q", architecture="PorterQwen2ForCausalLM")
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["architectures"] == ["PorterQwen2ForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        128,
        4,
        2,
    )
    assert "head_dim" not in cfg  # set only where the config class has it
    names = dict(S.iter_safetensors(ckpt))
    bias = names["model.layers.0.self_attn.k_proj.bias"]
    assert bias.abs().sum() > 0  # seeded, never the zeros an init would leave
    opt = json.loads((S.make_checkpoint("opt", tmp_path / "o") / "config.json").read_text())
    assert opt["word_embed_proj_dim"] != opt["hidden_size"]  # project_in / project_out


NATIVE_SUBCLASS = """\
from {target}.model_executor.models.llama import LlamaForCausalLM


class PorterLlamaForCausalLM(LlamaForCausalLM):
    pass
"""


@pytest.mark.e2e
@pytest.mark.parametrize("target", ["vllm", "aphrodite"])
def test_cli_json(target, tmp_path):
    d = fake_port(
        tmp_path, target, "llama", "LlamaForCausalLM", NATIVE_SUBCLASS.format(target=target)
    )
    proc = run_cli(str(d), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # engine logs stay off stdout
    assert report["ok"] and report["target"] == target
    assert report["port_class"].endswith(":PorterLlamaForCausalLM")
    assert report["native_class"] == f"{target}.model_executor.models.llama:LlamaForCausalLM"
    assert report["port_params"] == report["tensors_compared"] == 15
    assert (target == "aphrodite") == any("forward not run" in n for n in report["notes"])
