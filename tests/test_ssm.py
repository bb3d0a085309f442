"""Issue 26: state-space layers. Which HF mixers porter maps to the engine's MambaMixer2 (read from
the installed transformers' modeling files, never imported), the sizes it reads from them, and the
one-line refusal of what the engine cannot run on this CPU (Mamba-1's selective scan)."""

from __future__ import annotations

import re

import pytest
from conftest import run_porter

from porter.analysis.index import build_index, parse
from porter.analysis.ssm import find_mamba2_mixers
from porter.plan import build_plan
from porter.rules_data import strip_table
from porter.source import resolve


def _mixers(model_type: str):
    src = resolve(model_type)
    idx = build_index(parse(src.text, str(src.path)), str(src.path), src.text)
    return find_mamba2_mixers(idx, list(idx.classes))


# model_type -> (mixer class, builder, attribute, HF gated norm over the full width)
MAMBA2 = {
    "mamba2": ("Mamba2Mixer", "Mamba2Block", "mixer", True),
    "bamba": ("BambaMixer", "BambaDecoderLayer", "mamba", True),
    "granitemoehybrid": ("GraniteMoeHybridMambaLayer", "GraniteMoeHybridDecoderLayer", "mamba", True),
    "zamba2": ("Zamba2MambaMixer", "Zamba2MambaDecoderLayer", "mamba", False),  # its norm views per group
}


@pytest.mark.parametrize("model_type", sorted(MAMBA2))
def test_mamba2_mixer_recognised_with_its_sizes_over_the_config(model_type):
    cls, host, attr, full_width = MAMBA2[model_type]
    (p,) = _mixers(model_type)
    assert (p.cls, p.host, p.attr, p.norm_full_width) == (cls, host, attr, full_width)
    # every size is written over the builder's config: no `self.` left, none missing
    assert set(p.args) == {"hidden_size", "ssm_state_size", "conv_kernel_size", "intermediate_size",
                           "use_conv_bias", "use_bias", "n_groups", "num_heads", "head_dim",
                           "rms_norm_eps", "activation"}
    assert not any("self." in v for v in p.args.values()), p.args
    assert p.params["A"] == "A_log"  # loaded as the engine's A (-exp), renamed by load_weights


def test_mamba2_sizes_resolved_through_init_attributes():
    (p,) = _mixers("mamba2")
    # `self.intermediate_size = int(config.expand * self.hidden_size)`, itself over `self.hidden_size`
    assert p.args["intermediate_size"] == "int(config.expand * config.hidden_size)"
    assert p.args["ssm_state_size"] == "config.state_size"
    assert p.args["num_heads"] == "config.num_heads"  # the dt part of in_proj's split


@pytest.mark.parametrize("model_type", ["mamba", "falcon_mamba", "jamba"])
def test_mamba1_mixer_is_not_taken_for_mamba2(model_type):
    assert _mixers(model_type) == []


@pytest.mark.parametrize("model_type,where", [("mamba", "MambaMixer.forward(cache_params)"),
                                              ("falcon_mamba", "FalconMambaMixer.forward(cache_params)")])
def test_mamba1_refused_in_one_line_saying_the_engine_cannot_run_it_here(model_type, where, tmp_path):
    proc = run_porter("convert", model_type, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert re.search(rf"modeling_{model_type}\.py:\d+: ", line), line
    assert where in line and "Mamba-1 selective scan" in line and "selective_scan_fwd" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type,cls", [("lfm2", "Lfm2ShortConv"), ("lfm2_moe", "Lfm2MoeShortConv")])
def test_short_conv_recognised_reading_what_the_engine_reads_from_the_config(model_type, cls):
    (p,) = _mixers(model_type)
    assert (p.cls, p.kind, p.attr) == (cls, "short_conv", "conv")
    # the engine's ShortConv reads its kernel and bias from the config: HF's layer reads the same
    assert p.args["conv_kernel_size"] == "config.conv_L_cache"
    assert p.args["bias"] == p.args["in_bias"] == p.args["out_bias"] == "config.conv_bias"
    assert (p.args["config"], p.args["dim"], p.args["layer_idx"]) == ("config", "config.hidden_size", "layer_idx")


def test_granitemoehybrid_rotary_chosen_by_config_for_every_attention_layer():
    """`self.rotary_emb = R(config) if config.position_embedding_type == "rope" else None` in the
    model, the layers handed its table only under `if self.rotary_emb is not None:`: each attention
    rotates exactly when the config says rope, with the config's rope_parameters (as the engine's
    own granitemoehybrid port decides)."""
    src = resolve("granitemoehybrid")
    idx = build_index(parse(src.text, str(src.path)), str(src.path), src.text)
    attn = build_plan(idx, strip_table(), "granitemoehybrid", str(src.path)).attention("GraniteMoeHybridAttention")
    assert (attn.rope_when, attn.rope_params) == ('config.position_embedding_type == "rope"', "config.rope_parameters")
    assert attn.rope_tables == "GraniteMoeHybridModel.rotary_emb"


@pytest.mark.parametrize("model_type,limit", [("mamba2", "config.time_step_limit"), ("bamba", "config.time_step_limit"),
                                              ("granitemoehybrid", "config.time_step_limit"),
                                              ("zamba2", '(config.time_step_min, float("inf"))')])
def test_time_step_limit_read_over_the_config(model_type, limit):
    """HF clamps dt to `dt_limit` after its softplus; the engine's MambaMixer2 to (0, inf) only."""
    (p,) = _mixers(model_type)
    assert p.dt_limit == limit


def test_time_step_floor_computed_by_hf_is_refused_in_one_line():
    from porter.errors import PorterError
    from porter.passes.examples import apply_rule
    from porter.passes.ssm.engine_mamba_mixer import EngineMambaMixer

    before = EngineMambaMixer.examples[0].before.replace(
        "self.time_step_limit = config.time_step_limit", 'self.time_step_limit = (config.time_step_min, float("inf"))')
    with pytest.raises(PorterError) as err:
        apply_rule(EngineMambaMixer, before)
    line = str(err.value)
    assert "\n" not in line and 'clamps its time step to (config.time_step_min, float("inf"))' in line, line
    assert "(0, inf) only" in line and "class Mixer" in line, line


@pytest.mark.parametrize("model_type,says", [
    ("jamba", "JambaMambaMixer is a Mamba-1 selective scan, which the engine runs with `selective_scan_fwd`, missing "
              "from its CPU build"),
    ("zamba", "ZambaMambaMixer is a Mamba-1 selective scan"),  # per-head x_proj / dt_proj weights
    ("qwen3_next", "whose CPU path runs in BF16 only (its op asserts \"CPU GDN attention requires BF16.\"; the "
                   "engine's own Qwen3NextForCausalLM fails so in fp32 at TP=1 and 2): it cannot be verified here"),
    ("qwen3_5", "whose CPU path runs in BF16 only"),
    ("qwen3_5_moe", "whose CPU path runs in BF16 only"),
    ("kimi_linear", "Triton / GPU kernels only (no CPU path in the build): it cannot be run or verified here"),
    ("olmo_hybrid", "Triton kernels only (no CPU path in the build): it cannot be run or verified here"),
    ("zamba2", 'Zamba2MambaMixer, a Mamba-2 mixer, clamps its time step to (config.time_step_min, float("inf"))'),
    ("nemotron_h", "NemotronHMamba2Mixer, a Mamba-2 mixer, clamps its time step"),
])
def test_state_layers_the_engine_cannot_run_here_refused_saying_so(model_type, says, tmp_path):
    proc = run_porter("convert", model_type, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert re.search(rf"modeling_{model_type}\.py:\d+: ", line), line
    assert says in line, line
    if model_type == "olmo_hybrid":  # a gated delta-net is not taken for a Mamba-1 scan
        assert "Mamba-1" not in line, line
    assert not (tmp_path / "out").exists()
