"""convert: determinism, lint-clean output, committed ports up to date, static reading, bad input."""

from __future__ import annotations

import filecmp
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import GENERATED, ROOT, TARGETS, run_porter
from porter.source import installed_transformers_version


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# Every committed port is converted again and compared file by file with what is committed (the
# transformers ports by tests/test_diff.py, the others by `porter regen --check` in
# tests/test_regen.py::test_check_passes_on_the_committed_ports). Here, a
# sample with every family of rules (dense; fused q/k/v regrouped; Conv1D; MoE; latent attention;
# a state-space mixer; a day-zero port shipping its config) is converted twice, by processes whose
# string hashing differs (PYTHONHASHSEED), so that an order taken from a set or a hash shows.
SAMPLE = ("llama", "falcon", "gpt2", "mixtral", "deepseek_v2", "bamba", "dots3_note")


@pytest.fixture(scope="module")
def two_conversions(tmp_path_factory):
    a = tmp_path_factory.mktemp("a")
    b = tmp_path_factory.mktemp("b")
    for out, seed in ((a, "1"), (b, "2")):
        for model in SAMPLE:
            proc = run_porter("convert", model, "--out", str(out), *release_args(model),
                              env={"PYTHONHASHSEED": seed})
            assert proc.returncode == 0, proc.stderr
    return a, b


def release_args(model: str) -> list[str]:
    """`--transformers X` for a day-zero port (converted from a release newer than the installed one)."""
    version = json.loads((GENERATED / "vllm" / model / "PORT.json").read_text())["transformers_version"]
    return [] if version == installed_transformers_version() else ["--transformers", version]


def test_convert_is_deterministic(two_conversions):
    a, b = two_conversions
    da, db = tree_digest(a), tree_digest(b)
    assert da == db
    # PORT.json, pyproject, __init__, modeling (+ configuration for a day-zero port)
    assert len(da) == sum(len(json.loads((GENERATED / t / m / "PORT.json").read_text())["files"]) + 1
                          for t in TARGETS for m in SAMPLE)
    for target in TARGETS:  # and what the committed ports are (written by yet other processes)
        for model in SAMPLE:
            cmp = filecmp.dircmp(a / target / model, GENERATED / target / model)
            assert not cmp.diff_files and not cmp.left_only and not cmp.right_only, (target, model)


def test_generated_code_passes_ruff():
    """Every committed port (each what porter makes now: tests/test_diff.py) is lint clean."""
    ports = [str(GENERATED / t) for t in TARGETS]
    check = subprocess.run([sys.executable, "-m", "ruff", "check", "--config", str(ROOT / "pyproject.toml"), *ports],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    fmt = subprocess.run([sys.executable, "-m", "ruff", "format", "--check", "--config",
                          str(ROOT / "pyproject.toml"), *ports], capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout


def test_port_json_records_provenance():
    import json

    from porter.rules_data import day_zero_releases
    from porter.source import installed_transformers_version

    info = json.loads((GENERATED / "vllm" / "llama" / "PORT.json").read_text())
    assert info["source"] == "models/llama/modeling_llama.py"
    # the installed release (a newer one after the weekly regeneration), as the port's header says
    assert info["transformers_version"] in {installed_transformers_version(), *day_zero_releases()}
    header = (GENERATED / "vllm" / "llama" / "porter_vllm_llama" / "modeling_llama.py").read_text()
    assert f"# Source: transformers {info['transformers_version']}, models/llama/modeling_llama.py" in header
    assert info["architecture"] == "PorterLlamaForCausalLM"
    assert info["plugin_group"] == "vllm.general_plugins"
    src = ROOT / ".venv"  # the hash is of the installed file, read statically
    del src
    for rel, digest in info["files"].items():
        assert hashlib.sha256((GENERATED / "vllm" / "llama" / rel).read_bytes()).hexdigest() == digest
    assert info["plan"]["stacked_params"]
    aph = json.loads((GENERATED / "aphrodite" / "llama" / "PORT.json").read_text())
    assert aph["plugin_group"] == "aphrodite.general_plugins"
    text = (GENERATED / "aphrodite" / "llama" / "porter_aphrodite_llama" / "modeling_llama.py").read_text()
    assert "aphrodite_config" in text and "import vllm" not in text and "from vllm" not in text


def test_port_reads_like_a_hand_written_one():
    text = (GENERATED / "vllm" / "llama" / "porter_vllm_llama" / "modeling_llama.py").read_text()
    for needle in ("QKVParallelLinear(", "MergedColumnParallelLinear(", "RowParallelLinear(",
                   "VocabParallelEmbedding(", "ParallelLMHead(", "get_rope(", "self.attn(",
                   "def compute_logits", "def load_weights", "def embed_input_ids"):
        assert needle in text, needle
    for gone in ("attention_mask", "past_key_values", "position_ids", "PreTrainedModel",
                 "auto_docstring", "transformers", "repeat_kv", "rotate_half"):
        assert gone not in text.split('"""', 2)[-1], gone


STATIC_SRC = '''
import pathlib
pathlib.Path({marker!r}).write_text("module ran")

def _deco(f):
    pathlib.Path({marker!r}).write_text("decorator ran")
    return f

class ToyConfig:
    pathlib.Path({marker!r}).write_text("class body ran")

class ToyForCausalLM:
    @_deco
    def forward(self, x):
        return x
'''


def test_convert_never_executes_its_input(tmp_path):
    marker = tmp_path / "executed.txt"
    src = tmp_path / "modeling_toy.py"
    # a real model file with side effects added at module level, in a decorator and a class body
    llama = (Path(__import__("porter.source", fromlist=["x"]).transformers_root()) / "models" / "llama"
             / "modeling_llama.py").read_text()
    src.write_text(STATIC_SRC.format(marker=str(marker)).replace("class ToyForCausalLM:\n    @_deco\n"
                   "    def forward(self, x):\n        return x\n", "") + llama.replace(
                   "from .configuration_llama import LlamaConfig", "from .configuration_llama import LlamaConfig\n"
                   f"import pathlib as _p\n_p.Path({str(marker)!r}).write_text('import ran')"))
    proc = run_porter("convert", str(src), "--out", str(tmp_path / "out"), "--target", "vllm")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "vllm" / "toy" / "PORT.json").exists()
    assert not marker.exists()


BAD = {
    "not_python.py": ("\x00\x01binary", "binary file"),
    "syntax.py": ("def f(:\n    pass\n", "syntax error"),
    "nolm.py": ("import torch\nclass A(torch.nn.Module):\n    pass\n", "no *ForCausalLM class"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, name):
    text, expect = BAD[name]
    src = tmp_path / name
    src.write_bytes(text.encode("latin-1"))
    out = tmp_path / "out"
    proc = run_porter("convert", str(src), "--out", str(out))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(src) in lines[0] and expect in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_attention_without_qkv_names_file_line_and_rule(tmp_path):
    llama = (Path(__import__("porter.source", fromlist=["x"]).transformers_root()) / "models" / "llama"
             / "modeling_llama.py").read_text()
    broken = llama.replace("            query_states,\n            key_states,\n            value_states,\n",
                           "            hidden_states,\n            hidden_states,\n            hidden_states,\n")
    assert broken != llama
    src = tmp_path / "modeling_broken.py"
    src.write_text(broken)
    proc = run_porter("convert", str(src), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert f"{src}:" in line and "LlamaAttention.forward" in line and "fuse-qkv" in line, line
    assert not (tmp_path / "out").exists()


def test_qkv_from_different_inputs_is_refused(tmp_path):
    """CTRL's attention takes q, k and v as three parameters: one fused projection is exact only
    because its caller passes one tensor for all three; a caller passing two refuses."""
    ctrl = (Path(__import__("porter.source", fromlist=["x"]).transformers_root()) / "models" / "ctrl"
            / "modeling_ctrl.py").read_text()
    broken = ctrl.replace("            normed,\n            normed,\n            normed,\n",
                          "            normed,\n            x,\n            normed,\n")
    assert broken != ctrl
    src = tmp_path / "modeling_ctrl.py"
    src.write_text(broken)
    proc = run_porter("convert", str(src), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert f"{src}:" in line and "different inputs" in line and "MultiHeadAttention.forward" in line, line
    assert not (tmp_path / "out").exists()


def test_unknown_model_type_and_target(tmp_path):
    proc = run_porter("convert", "no_such_model", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "unknown model_type 'no_such_model'" in proc.stderr
    proc = run_porter("convert", "llama", "--target", "tgi", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "unknown target 'tgi'" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_hand_edited_port_is_not_overwritten_without_force(tmp_path):
    out = tmp_path / "out"
    assert run_porter("convert", "llama", "--target", "vllm", "--out", str(out)).returncode == 0
    mod = out / "vllm" / "llama" / "porter_vllm_llama" / "modeling_llama.py"
    mod.write_text(mod.read_text() + "\n# my edit\n")
    proc = run_porter("convert", "llama", "--target", "vllm", "--out", str(out))
    assert proc.returncode == 2 and "modeling_llama.py" in proc.stderr and "--force" in proc.stderr
    assert mod.read_text().endswith("# my edit\n")
    assert run_porter("convert", "llama", "--target", "vllm", "--out", str(out), "--force").returncode == 0
    assert not mod.read_text().endswith("# my edit\n")


def test_targets_share_the_rules_before_the_target_split():
    """Converting for both targets at once (the shared rules run once) gives each target the port
    it gets alone; a rule before the split cannot read what differs between targets."""
    from porter.convert import analyse, convert_one, convert_targets
    from porter.passes.base import SharedTarget
    from porter.rules_data import get_target
    from porter.source import resolve

    targets = [get_target("vllm"), get_target("aphrodite")]
    source = resolve("qwen2")
    idx, plan = analyse(source)
    together = convert_targets(source, idx, plan, targets)
    for conv, target in zip(together, targets):
        idx, plan = analyse(source)
        alone = convert_one(source, idx, plan, target)
        assert conv.files == alone.files and conv.rules_applied == alone.rules_applied
        assert conv.provenance == alone.provenance
    assert together[0].files != together[1].files

    shared = SharedTarget(targets)
    assert shared.symbols["QKVParallelLinear"].endswith(":QKVParallelLinear")
    with pytest.raises(AssertionError, match="EngineConfig"):
        shared.symbols["EngineConfig"]  # VllmConfig / AphroditeConfig
    with pytest.raises(AttributeError, match="config_kwarg"):
        shared.config_kwarg  # noqa: B018


def test_paired_bench_without_a_native_class_is_one_line_error():
    # phi: vLLM 0.32 has no native PhiForCausalLM to pair the port with
    proc = run_porter("bench", "phi", "--paired")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no native class for PhiForCausalLM" in lines[0] and "PORT.json" in lines[0]


def test_rotary_on_a_slice_of_each_head_no_rule_folds_is_refused_in_one_line():
    """The engine's rotary splits each head itself (partial_rotary_factor); a slice of q/k handed to it
    (a partial-rotary split PT019 does not fold: the rest taken inline) would be rotated as whole heads.
    Before PT019 read GPT-NeoX-Japanese's four-statement split, its port did exactly that, silently."""
    from porter.errors import PorterError
    from porter.passes.examples import apply_rule
    from porter.passes.rope.engine_rope import EngineRope

    pair = "        q, k = apply_rotary_pos_emb(q, k, cos, sin)\n"
    (example,) = [e for e in EngineRope.examples if pair in e.before][:1]  # the q/k pair's example
    before = example.before.replace(
        pair,
        "        q_rot = q[..., : self.n]\n        k_rot = k[..., : self.n]\n"
        "        q_r, k_r = apply_rotary_pos_emb(q_rot, k_rot, cos, sin)\n"
        "        q = torch.cat((q_r, q[..., self.n :]), dim=-1)\n        k = torch.cat((k_r, k[..., self.n :]), dim=-1)\n")
    assert before != example.before
    with pytest.raises(PorterError) as err:
        apply_rule(EngineRope, before)
    line = str(err.value)
    assert "\n" not in line and "rotary applied to a slice of each head" in line and "Attn.forward" in line, line
