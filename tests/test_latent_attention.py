"""Issue 25: multi-head latent attention beyond what the engine's MLA layer computes is refused
naming what it also uses; the read of the latent parts picks the query by its split."""

from __future__ import annotations

import pytest

from porter.analysis.index import build_index, parse
from porter.analysis.latent_attention import latent_attention
from porter.analysis.latent_extras import latent_extras
from porter.source import resolve


def _latent(model_type: str):
    src = resolve(model_type)
    idx = build_index(parse(src.text, str(src.path)), str(src.path), src.text)
    found = [(info, la) for info in idx.classes.values() if (la := latent_attention(idx, info)) is not None]
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3", "glm4_moe_lite", "axk1", "minicpm3", "youtu"])
def test_mla_layer_computes_all_of_the_deepseek_family(model_type):
    info, la = _latent(model_type)
    assert latent_extras(info, la) == []
    assert la.q_a == "q_a_proj" and la.kv_a == "kv_a_proj_with_mqa" and la.kv_b == "kv_b_proj"


def test_gate_indexer_and_sinks_are_named_not_read_as_the_query():
    # hy_v4's gate_proj is a projection of the hidden states too: it is not split [nope, rope], so not
    # the query; its indexer's output reaches `indices=` (sparse attention)
    info, la = _latent("hy_v4")
    assert la.q is None and la.q_a == "q_a_proj"
    extras = latent_extras(info, la)
    assert "module self.gate_proj" in extras and "parameter self.sinks" in extras
    assert any(e.startswith("module self.indexer whose output selects the keys") and
               "'Sparse Attention is not supported on CPU'" in e for e in extras)


def test_rescaled_latents_are_named(tmp_path):
    from conftest import run_porter

    proc = run_porter("convert", "longcat_flash", "--out", str(tmp_path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "modeling_longcat_flash.py:" in proc.stderr and "(rule latent-attention)" in proc.stderr
    assert "the scale `k_pass * self.mla_scale_kv_lora`" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_decompressed_port_keeps_the_scale_before_the_head(tmp_path):
    # minicpm3 (PT281): ordinary attention over the decompressed keys/values; its causal LM divides
    # the hidden states by config.logits_scaling before lm_head, which the logits processor applies
    from conftest import run_porter

    proc = run_porter("convert", "minicpm3", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    port = next(tmp_path.rglob("modeling_minicpm3.py")).read_text()
    assert "scale=(1.0 / self.config.logits_scaling)" in port
    assert "nn.functional.pad(v, [0, head_size - self.v_head_dim])" in port


@pytest.mark.parametrize("model_type", ["axk2", "deepseek_v32", "glm_moe_dsa"])
def test_sparse_indexer_is_named_whatever_the_query(model_type, tmp_path):
    # axk2's query comes with an output gate from one projection of cat(latent, normed latent)
    # (`q_gate_proj`), so latent attention's reader does not take the class whole; its KV side is the
    # latent one all the same, and the line names the indexer (no CPU backend) and the gate, not the
    # "q/k/v projections" it lacks
    from conftest import run_porter

    proc = run_porter("convert", model_type, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert f"modeling_{model_type}.py:" in line and "(rule latent-attention)" in line, line
    assert "module self.indexer whose output selects the keys" in line, line
    assert "'Sparse Attention is not supported on CPU'" in line, line
    assert ("module self.q_gate_proj" in line) == (model_type == "axk2"), line
    assert not (tmp_path / "out").exists()


def test_mixture_of_attention_heads_is_named(tmp_path):
    # jetmoe's query comes from `self.experts.map(...)`, a module that routes each token to its top-k
    # experts (each projecting query heads of its own); the engine has no such attention
    from conftest import run_porter

    proc = run_porter("convert", "jetmoe", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "modeling_jetmoe.py:" in line and "in JetMoeAttention.forward (rule fuse-qkv)" in line, line
    assert "a mixture of attention heads (the query comes from `self.experts.map(hidden_states)`" in line, line
    assert "module self.experts (JetMoeMoA) routes each token to its top-k experts" in line, line
    assert not (tmp_path / "out").exists()


def _latent_of(src):
    idx = build_index(parse(src.text, str(src.path)), str(src.path), src.text)
    found = [(idx, info, la) for info in idx.classes.values() if (la := latent_attention(idx, info)) is not None]
    assert len(found) == 1
    return found[0]


def test_what_surrounds_dots3_latent_attention_is_read_from_its_dataflow():
    # transformers 5.25's dots3_note: a per-head sigmoid gate (g_proj: hidden -> heads), both normed latents
    # rescaled, the shared rope key normed before the rotary, and a DSA indexer whose top-k is
    # min(config.index_topk, keys): every key within that bound (PT282 checks it at load)
    from porter.analysis.latent_around import latent_around
    from porter.source import transformers_tree

    idx, info, la = _latent_of(resolve("dots3_note", transformers_dir=transformers_tree("5.25.0")))
    around = latent_around(idx, info, la)
    assert (around.gate, around.q_scale, around.kv_scale, around.k_rope_norm) == (
        "g_proj", "self.q_lora_scale", "self.kv_lora_scale", "k_rope_only_layernorm")
    assert (around.indexer, around.indexer_cls, around.index_topk) == ("indexer", "Dots3NoteTextIndexer", "config.index_topk")
    assert latent_extras(info, la, around.roles()) == []
    # without them, what the engine's MLA layer has no place for is named, as before
    assert {"module self.g_proj", "module self.k_rope_only_layernorm"} <= set(latent_extras(info, la))


def test_an_indexer_without_a_bound_it_selects_every_key_within_stays_refused():
    # glm_moe_dsa's indexer (its top-k not `min(self.<bound>, keys)` read from the config) and hy_v4's: no
    # bound, so nothing around them is kept; longcat_flash's query rescale multiplies the split parts, not
    # the normed latent: named still
    from porter.analysis.latent_around import latent_around

    for model_type in ("glm_moe_dsa", "hy_v4"):
        idx, info, la = _latent_of(resolve(model_type))
        assert latent_around(idx, info, la).indexer is None, model_type
    idx, info, la = _latent_of(resolve("longcat_flash"))
    around = latent_around(idx, info, la)
    assert around.q_scale is None and "the scale `q_pass * self.mla_scale_q_lora`" in latent_extras(info, la, around.roles())


def test_dots3_port_keeps_no_indexer_and_refuses_a_longer_max_model_len_at_load(tmp_path):
    from conftest import run_porter

    proc = run_porter("convert", "dots3_note", "--transformers", "5.25.0", "--target", "all", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for target, accessor in (("vllm", "get_current_vllm_config"), ("aphrodite", "get_current_aphrodite_config")):
        port = next((tmp_path / target).rglob("modeling_dots3_note.py")).read_text()
        assert "Indexer" not in port and "self.indexer" not in port
        assert f"and {accessor}().model_config.max_model_len > config.index_topk" in port
        # its tensors skipped: the WeightsMapper maps them to None
        assert "(indexer)" in port and "): None,  # a sparse-attention indexer the port does not build" in port
        assert "* self.q_lora_scale" in port and "* self.kv_lora_scale" in port
        assert "k_pe = self.k_rope_only_layernorm(" in port
        assert "gate.sigmoid().unsqueeze(-1)" in port and "per_layer_sliding_window=self.sliding_window" in port
        assert "**config.rope_parameters[config.layer_types[layer_idx]]" in port


@pytest.mark.e2e
def test_dots3_port_loads_within_index_topk_and_refuses_beyond_it_in_the_engine(tmp_path):
    # the committed port on the tiny checkpoint the release's transformers writes (index_topk 128): the
    # engine serves it at max_model_len 128 (the bound: every key selected) and refuses 256 at load,
    # naming both numbers, rather than serving sparse attention as dense past the bound
    from pathlib import Path

    from porter.layout import PortInfo
    from porter.verify import hf_side
    from porter.verify.engine import run_engine

    port = Path(__file__).resolve().parents[1] / "generated" / "vllm" / "dots3_note"
    info = PortInfo.load(port)
    info.path = port
    hf = hf_side(info, tmp_path)
    ckpt = hf.checkpoint(tmp_path / "ckpt", info.architecture)
    prompt = hf.prompts[0]
    within = run_engine(ckpt, 1, [prompt], port=info, max_tokens=2, top_logprobs=1, max_model_len=128)
    assert within.ok, within.error
    beyond = run_engine(ckpt, 1, [prompt], port=info, max_tokens=2, top_logprobs=1, max_model_len=256)
    assert not beyond.ok
    text = (beyond.error or "") + beyond.log_tail
    assert "at most index_topk=128 tokens" in text and "max_model_len=256 is above it" in text, text[-2000:]
