"""`porter verify PORT --checkpoint DIR` refuses a bad checkpoint folder in one line naming the
file or tensor (exit 2), before any model or engine runs: hand-made broken folders, each a tiny
llama checkpoint with one thing wrong."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from conftest import ROOT, run_group, run_porter

PORT = str(ROOT / "generated" / "vllm" / "llama")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    from porter.verify.structure import make_checkpoint

    ckpt = make_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "good",
                           hf_architecture="LlamaForCausalLM")
    (ckpt / "tokenizer.json").write_text("{}\n")  # present; a bad folder fails before it is read
    return ckpt


def _safetensors(d):
    [st] = list(d.glob("*.safetensors"))
    return st


def _edit_tensors(d, edit):
    from safetensors.torch import load_file, save_file

    st = _safetensors(d)
    sd = load_file(str(st))
    edit(sd)
    save_file(sd, str(st), metadata={"format": "pt"})


def _missing(d):
    _edit_tensors(d, lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight"))
    return ["model.layers.1.mlp.down_proj.weight", "model.safetensors", "no tensor"]


def _shape(d):
    def cut(sd):
        sd["model.layers.0.self_attn.k_proj.weight"] = sd["model.layers.0.self_attn.k_proj.weight"][:-8].clone()
    _edit_tensors(d, cut)
    return [f"{_safetensors(d)}: tensor model.layers.0.self_attn.k_proj.weight has shape", "config.json implies"]


def _architecture(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (d / "config.json").write_text(json.dumps(cfg))
    return [f"{d / 'config.json'}: architecture MistralForCausalLM (model_type mistral) is not what "
            "the port serves: LlamaForCausalLM (model_type llama)"]


def _no_tokenizer(d):
    (d / "tokenizer.json").unlink()
    return [f"{d}: no tokenizer"]


def _truncated(d):
    st = _safetensors(d)
    data = st.read_bytes()
    st.write_bytes(data[:-1000])
    return [f"{st}: truncated: tensor ", f"the file holds {len(data) - 1000 - 8 - int.from_bytes(data[:8], 'little')}"]


def _no_config(d):
    (d / "config.json").unlink()
    return [f"{d / 'config.json'}: missing"]


def _no_safetensors(d):
    _safetensors(d).unlink()
    return [f"{d}: no *.safetensors file"]


FAULTS = {f.__name__.lstrip("_"): f for f in
          (_missing, _shape, _architecture, _no_tokenizer, _truncated, _no_config, _no_safetensors)}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_bad_checkpoint_is_one_line_naming_file_or_tensor(fault, good, tmp_path):
    d = tmp_path / fault
    shutil.copytree(good, d)
    expect = FAULTS[fault](d)
    proc = run_porter("verify", PORT, "--tp", "1", "--checkpoint", str(d))
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("porter: error: "), proc.stderr
    for part in expect:
        assert part in lines[0], (part, lines[0])
    assert proc.stdout == ""


def test_prompts_without_checkpoint_is_refused(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("Hello\n")
    proc = run_porter("verify", "llama", "--prompts", str(f))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--prompts goes with --checkpoint" in proc.stderr


def test_tp_split_by_heads():
    from porter.verify.checkpoint import split_tps

    # SmolLM2-135M: 9 heads, 3 KV heads
    run, skipped = split_tps({"num_attention_heads": 9, "num_key_value_heads": 3}, [1, 2])
    assert run == [1] and skipped == {2: "9 attention heads do not divide among 2 ranks"}
    run, skipped = split_tps({"num_attention_heads": 8, "num_key_value_heads": 1}, [1, 2])
    assert run == [1, 2] and not skipped  # one KV head, replicated on both ranks


def test_prompts_file_forms(tmp_path):
    from porter.verify.checkpoint import read_prompts

    (tmp_path / "p.txt").write_text("First question?\n\n  Second one.  \n")
    assert read_prompts(tmp_path / "p.txt") == ["First question?", "Second one."]
    (tmp_path / "p.json").write_text(json.dumps(["a\nmultiline prompt", "b"]))
    assert read_prompts(tmp_path / "p.json") == ["a\nmultiline prompt", "b"]


def test_script_entry_has_no_traceback_on_missing_folder(tmp_path):
    proc = run_group([sys.executable, "-m", "porter", "verify", PORT, "--checkpoint", str(tmp_path / "nowhere")],
                     timeout=300)
    assert proc.returncode == 2 and "no such checkpoint folder" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_report_shows_skipped_tps_and_answers():
    from porter.verify.report import VerifyReport, render_report

    rep = VerifyReport(port_dir="generated/vllm/llama", tps=[1], checkpoint="ckpt",
                       skipped_tps={"2": "9 attention heads do not divide among 2 ranks"},
                       chat_template=True, prompt_texts=["What is [the] capital?"],
                       reference_texts=["Paris."], engine_texts={"port TP=1": ["Lyon."]})
    text = render_report(rep)
    assert "TP=2 skipped: 9 attention heads do not divide among 2 ranks" in text
    assert "[0] 'What is [the] capital?' -> 'Paris.'" in text and "port TP=1: 'Lyon.'" in text
    assert render_report(rep, json=True).count('"skipped_tps"') == 1
