"""Packed q/k/v whose layout a config flag picks (GPTBigCode's `if self.multi_query:` arms), and the
encoder-decoder cross-attention arm a decoder-only port drops (PT123)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_porter


def _plan(model_type: str) -> dict:
    proc = run_porter("plan", model_type)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_gpt_bigcode_split_by_sizes_or_per_head_by_flag():
    plan = _plan("gpt_bigcode")
    (attn,) = plan["attentions"]
    assert (attn["q"], attn["k"], attn["v"], attn["o"]) == ("c_attn", "c_attn", "c_attn", "c_proj")
    assert attn["packed"] and not attn["interleaved"]
    # sizes from `.split((self.embed_dim, self.kv_dim, self.kv_dim), dim=3)`
    assert attn["num_heads"] == "self.embed_dim // self.head_dim"
    assert attn["num_kv_heads"] == "self.kv_dim // self.head_dim"
    # the other arm views c_attn per head: permuted when loading unless multi_query
    assert attn["interleaved_unless"] == "multi_query"
    # the cross-attention projection (`q_attn`, is_cross_attention arm) is not a q/k/v source
    assert all(lp["attr"] != "q_attn" or lp["role"] != "qkv" for lp in plan["linears"])


def test_gpt_bigcode_port_has_no_cross_attention_arm():
    src = next((p for p in Path(__file__).resolve().parents[1].joinpath(
        "generated", "vllm", "gpt_bigcode").rglob("modeling_gpt_bigcode.py")))
    text = src.read_text()
    assert "q_attn" not in text and "cross_attention:" not in text and "crossattention" not in text
    assert '"multi_query"' in text and "if self.multi_query:" not in text


def test_gpt2_conv1d_is_a_transposed_linear_split_in_three():
    plan = _plan("gpt2")
    (attn,) = plan["attentions"]
    assert (attn["q"], attn["o"], attn["packed"], attn["interleaved"]) == ("c_attn", "c_proj", True, False)
    # `.split(self.split_size, dim=2)`: three equal parts
    assert attn["num_heads"] == attn["num_kv_heads"] == "self.split_size // self.head_dim"
    # Conv1D(nf, nx) is Linear(nx, nf)
    assert attn["hidden_size"] == "self.embed_dim"
    assert plan["transposed_linears"] == ["c_attn", "c_fc", "c_proj"]  # not the cross-attention q_attn
    roles = {(lp["cls"], lp["attr"]): lp["role"] for lp in plan["linears"]}
    assert roles[("GPT2MLP", "c_fc")] == "column" and roles[("GPT2MLP", "c_proj")] == "row"


def test_gpt2_port_transposes_conv1d_weights_and_keeps_the_attention_function_arm():
    text = next(Path(__file__).resolve().parents[1].joinpath("generated", "vllm", "gpt2").rglob(
        "modeling_gpt2.py")).read_text()
    assert 'name.endswith((".c_attn.weight", ".c_fc.weight", ".c_proj.weight"))' in text
    assert "loaded_weight = loaded_weight.t()" in text
    assert "_upcast_and_reordered_attn" not in text and "maybe_autocast" not in text
    assert "= Conv1D(" not in text and "kwargs" not in text and "input_shape" not in text
