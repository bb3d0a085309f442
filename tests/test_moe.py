"""Issue 10: mixture-of-experts blocks found by dataflow, their checkpoint names read statically,
and the tiny reference models' routers sending the test prompts to several experts."""

from __future__ import annotations

from pathlib import Path

import pytest

from porter.analysis.checkpoint_names import expert_checkpoint_names, module_renamings, weight_renamings
from porter.analysis.index import build_index, parse
from porter.analysis.moe import find_moe_blocks
from porter.analysis.moe_flat import find_flat_blocks
from porter.source import resolve

MOE_MODELS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe"]


def _blocks(model_type: str):
    src = resolve(model_type)
    idx = build_index(parse(src.text, str(src.path)), str(src.path), src.text)
    found = find_moe_blocks(idx, list(idx.classes))
    return src, found + find_flat_blocks(idx, list(idx.classes), found)


@pytest.mark.parametrize("model_type", MOE_MODELS)
def test_moe_block_found_by_dataflow(model_type):
    _, blocks = _blocks(model_type)
    assert len(blocks) == 1
    b = blocks[0]
    assert b.router_cls.endswith("Router") and b.experts_cls.endswith("Experts")
    assert b.top_k == "config.num_experts_per_tok" and b.hidden_size == "config.hidden_size"
    assert b.num_experts in ("config.num_local_experts", "config.num_experts")
    assert (b.gate_up, b.down) == ("gate_up_proj", "down_proj")
    assert b.activation == "config.hidden_act"


def test_moe_renormalisation_read_from_the_router():
    # mixtral divides the top-k weights by their sum; granitemoe takes a softmax of the top-k
    # logits (the same); qwen renormalises only when config.norm_topk_prob says so
    assert _blocks("mixtral")[1][0].renormalize == "True"
    assert _blocks("granitemoe")[1][0].renormalize == "True"
    assert _blocks("qwen3_moe")[1][0].renormalize == "config.norm_topk_prob"
    assert _blocks("mixtral")[1][0].intermediate_size == "config.intermediate_size"
    assert _blocks("qwen2_moe")[1][0].intermediate_size == "config.moe_intermediate_size"


def test_expert_checkpoint_names_from_conversion_mapping():
    src = resolve("mixtral")
    root = Path(src.path).resolve().parents[2]
    assert expert_checkpoint_names(root, ["mixtral"], "gate_up_proj", "down_proj") == ("w1", "w2", "w3")
    # qwen3_moe / olmoe have no entry of their own: transformers uses qwen2_moe's
    for mt in ("qwen2_moe", "qwen3_moe", "olmoe"):
        assert expert_checkpoint_names(root, [mt], "gate_up_proj", "down_proj") == \
            ("gate_proj", "down_proj", "up_proj")
    assert expert_checkpoint_names(root, ["granitemoe"], "gate_up_proj", "down_proj") is None  # packed
    attrs, rest = module_renamings(weight_renamings(root, ["mixtral"]))
    assert attrs == {"mlp": "block_sparse_moe"} and rest == []
    attrs, rest = module_renamings(weight_renamings(root, ["gpt_neox", "GPTNeoXForCausalLM"]))
    assert attrs == {} and rest == [(r"^embed_out\.", "lm_head.")]  # anchored: a load-time rename


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe"])
def test_tiny_reference_routes_prompts_to_several_experts(model_type):
    from porter.verify.tiny import _special_ids, build_model, experts_routed, make_prompts, tiny_spec

    src, blocks = _blocks(model_type)
    spec = tiny_spec(model_type)
    arch = next(c for c in src.text.split("class ")[1:] if c.split("(")[0].endswith("ForCausalLM"))
    model = build_model(spec, arch.split("(")[0])
    prompts = make_prompts(spec, model.config.vocab_size, _special_ids(model.config))
    routed = experts_routed(model, prompts, [blocks[0].router_cls])
    assert routed, "no router module found"
    for name, experts in routed.items():
        assert len(experts) >= 2, (name, experts)


def test_engine_routing_read_from_the_router():
    # issue 24: sigmoid scores, a correction bias (the router's own, or one the block hands to it),
    # grouped top-k and a scaled weight are the engine's grouped top-k router, read from dataflow
    b = _blocks("glm4_moe")[1][0]
    assert (b.scoring_func, b.correction_bias, b.renormalize) == ("sigmoid", "gate", "config.norm_topk_prob")
    assert (b.n_group, b.topk_group, b.routed_scaling) == ("config.n_group", "config.topk_group",
                                                           "config.routed_scaling_factor")
    b = _blocks("hy_v3")[1][0]  # the bias lives on the block: `self.gate(x, self.e_score_correction_bias)`
    assert (b.correction_bias, b.n_group, b.routed_scaling) == ("e_score_correction_bias", None,
                                                                "config.router_scaling_factor")
    b = _blocks("afmoe")[1][0]  # the router's projection is an nn.Linear: `router.gate.weight`
    assert (b.router_weight, b.correction_bias, b.renormalize) == ("gate.weight", "expert_bias", "True")
    b = _blocks("hunyuan_v1_moe")[1][0]  # softmax top-k, renormalised, through `gate.wg`
    assert (b.scoring_func, b.router_weight, b.correction_bias) == ("softmax", "wg.weight", None)
    for m in MOE_MODELS:  # the plain routers read as before: no bias, groups or scale
        assert all(p.correction_bias is None and p.n_group is None and p.routed_scaling is None
                   for p in _blocks(m)[1])


def test_router_keyed_by_a_config_string_is_read_branch_by_branch():
    # issue 25: DeepSeek-V2 picks its top-k by `self.topk_method` ("greedy" / "group_limited_greedy",
    # the latter masking the groups with 0.0, below every softmax score): one grouped top-k whose
    # groups are the config's where that branch's test holds, one group elsewhere
    b = _blocks("deepseek_v2")[1][0]
    grouped = 'config.topk_method == "group_limited_greedy"'
    assert (b.scoring_func, b.correction_bias, b.renormalize) == ("softmax", None, "False")
    assert (b.n_group, b.topk_group) == (f"config.n_group if {grouped} else 1", f"config.topk_group if {grouped} else 1")
    assert b.routed_scaling == "config.routed_scaling_factor" and not b.routing_function


def test_router_the_engine_cannot_express_routes_with_its_own_code():
    # a renormalisation clamped below (ernie4_5_moe), a sparsemixer (phimoe), a soft cap on the
    # logits (laguna): the router's own code after the logits is FusedMoE's custom_routing_function
    for model_type, weight in (("ernie4_5_moe", "weight"), ("phimoe", "weight"), ("laguna", "weight")):
        b = _blocks(model_type)[1][0]
        assert b.routing_function and b.router_logits == "router_logits" and b.router_weight == weight
        assert b.route_outputs == [1, 2] and b.correction_bias is None
    assert _blocks("phimoe")[1][0].router_dims == ["config.hidden_size", "config.num_local_experts"]
    assert not any(p.routing_function for m in MOE_MODELS + ["glm4_moe", "hy_v3"] for p in _blocks(m)[1])


def test_router_handed_a_bias_by_its_block_routes_with_its_own_code_bound_to_it():
    # lfm2_moe: `if self.use_expert_bias: <biased top-k> else: <top-k>`, then the top-k weights over
    # their sum + 1e-6 (not the engine's renormalisation): a routing function, handed the block's
    # own correction bias (a local bound once to `self.expert_bias if self.use_expert_bias else None`);
    # its experts' activation is `F.silu`
    (b,) = _blocks("lfm2_moe")[1]
    assert b.routing_function and b.route_outputs == [1, 2] and b.correction_bias is None
    assert [list(a) for a in b.route_args] == [["expert_bias", "self.expert_bias if self.use_expert_bias else None"]]
    assert b.activation == '"silu"' and b.top_k == "config.num_experts_per_tok"
    assert not any(p.route_args for m in MOE_MODELS + ["ernie4_5_moe", "phimoe", "laguna"] for p in _blocks(m)[1])


@pytest.mark.parametrize("model_type", ["inkling_text"])
def test_other_routing_is_a_diagnostic_not_a_silent_port(model_type, tmp_path):
    # inkling's router also returns gammas that weigh its shared experts in the block: FusedMoE's
    # router returns weights and indices only, so convert stops with file:line.
    from conftest import run_porter

    proc = run_porter("convert", model_type, "--out", str(tmp_path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"modeling_{model_type.removesuffix('_text')}.py:" in proc.stderr
    assert "cannot port mixture of experts" in proc.stderr
    assert "(rule fused-moe)" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_transposed_experts_read_from_the_products():
    # Aria stores its experts (experts, in, out) and applies them as `x @ W[e]`: FusedMoE loads
    # them transposed, and the intermediate size is the down weight's middle dimension
    _, blocks = _blocks("aria_text")
    assert len(blocks) == 1
    b = blocks[0]
    assert b.transposed and (b.gate_up, b.down) == ("gate_up_proj", "down_proj")
    assert (b.num_experts, b.top_k) == ("config.moe_num_experts", "config.moe_topk")
    assert (b.hidden_size, b.intermediate_size) == ("config.hidden_size", "config.intermediate_size")
    assert b.renormalize == "True" and b.activation == '"silu"'
    assert not any(p.transposed for m in MOE_MODELS for p in _blocks(m)[1])


def test_checkpoint_renamings_chained_and_split_qkv_day_zero():
    # sarvam_moe (5.24.0): `.attention.` -> `.self_attn.` keeps the checkpoint's module name in the
    # port, so the renamings after it that name `.self_attn.` are read as `.attention.`; its fused
    # `query_key_value` (Split(dim=0) into q_proj, k_proj, v_proj) loads whole into qkv_proj
    from porter.analysis.checkpoint_names import split_qkv_renamings
    from porter.source import transformers_tree

    root = transformers_tree("5.24.0")
    attrs, rest = module_renamings(weight_renamings(root, ["sarvam_moe"]))
    assert attrs == {"self_attn": "attention"}
    assert (r"\.attention\.dense\.", ".attention.o_proj.") in rest
    assert not any("self_attn" in s or "self_attn" in d for s, d in rest)
    assert split_qkv_renamings(root, ["sarvam_moe"], "q_proj", "k_proj", "v_proj", "qkv_proj") == \
        [(r"\.query_key_value\.", ".qkv_proj.")]
    assert split_qkv_renamings(root, ["sarvam_moe"], "q_proj", "v_proj", "k_proj", "qkv_proj") == []  # order
    assert split_qkv_renamings(root, ["mixtral"], "q_proj", "k_proj", "v_proj", "qkv_proj") == []
    # minicpm5_moe (5.25.0): a renaming appended after the table (`mapping[...].append(WeightRenaming(...))`)
    assert weight_renamings(transformers_tree("5.25.0"), ["minicpm5_moe"])[-1] == \
        ("self_attn.q_proj", "self_attn.q_gate_proj")


def test_flat_experts_routed_by_the_blocks_own_method():
    # dbrx: the router returns logits only; the block's `route_tokens_to_experts` takes softmax, top-k
    # and divides by the p-norm (moe_normalize_expert_weights), kept as FusedMoE's custom routing
    # function; the experts' module inside holds w1 / v1 / w2 flat, (experts * ffn, hidden), applied
    # as act(x @ w1.T) * (x @ v1.T) @ w2: gate, up, down (down transposed from FusedMoE's w2)
    (b,) = _blocks("dbrx")[1]
    assert (b.cls, b.router, b.router_cls, b.experts_cls) == ("DbrxFFN", "router", "DbrxRouter", "DbrxExperts")
    assert list(b.flat) == ["mlp", "DbrxExpertGLU", "w1", "v1", "w2"] and b.route_method == "route_tokens_to_experts"
    assert (b.num_experts, b.top_k) == ("config.ffn_config.moe_num_experts", "config.ffn_config.moe_top_k")
    assert (b.hidden_size, b.intermediate_size) == ("config.ffn_config.hidden_size", "config.ffn_config.ffn_hidden_size")
    assert b.renormalize == "False" and b.router_logits == "router_logits" and not b.routing_function
    assert not any(p.flat or p.route_method for m in MOE_MODELS for p in _blocks(m)[1])
