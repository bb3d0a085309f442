"""Issue 6: the dense decoders porter does not port yet (and the hybrid and recurrent ones it must
not port silently) fail with one line naming file:line and the
construct that blocks them (what `porter coverage` lists), and write nothing."""

from __future__ import annotations

import re

import pytest
from conftest import run_porter

# model_type -> (class or method the line must name, construct in the message)
BLOCKED = {
    # (falcon, the blocker this test was written for, ports now: grouped q/k/v, PT170/PT171)
    # (biogpt and codegen, blocked here once, port now: the self-attention arm of a cross-attention
    # flag, PT150's softmax module built on the spot, codegen's mp_num blocks of q/v/k)
    # (gpt_neox_japanese, blocked here once, ports now: PT150 reads `torch.baddbmm` over zeros as the scores
    # scaled by alpha (its `_attn` below forward bound late), PT023 its q/k/v sliced per head one statement
    # each, PT019 its partial rotary split in four statements, PT011 the last layer's `dense_bias` kept in
    # the narrowed `(out, bias)` its layer unpacks)
    # scores plus a learned relative-position bias (CpmAntSegmentPositionEmbedding's nn.Parameter table
    # looked up by relative-position buckets), then a stored softmax module: the engine's Attention
    # takes no score bias (named before the generic "attention computed inline")
    "cpmant": ("CpmAntAttention.forward", "a learned relative-position bias added to the attention scores"),
    # the mask handed to the attention call is computed from the layer's own projections (Doge's
    # dynamic mask attention: exp(A * softplus(dt_proj(v))) added to the scores, top-k kept): once
    # converted into a port whose engine attention call left that mask out
    "doge": ("DogeAttention.forward", "attention mask computed from the layer's own projections"),
    # differential attention: two attention calls over the same q/k and two halves of v, combined
    # across heads h and h + heads/2 (once a port calling one engine Attention twice, whose second
    # call would overwrite the values the first cached)
    "diffllama": ("DiffLlamaAttention.forward", "two attention calls one after the other"),
    # recurrent state across steps (`_is_stateful`): once converted into ports that dropped the
    # Mamba / xLSTM layers (built through a table, a helper method, or defined under a module-level
    # `if`) and referred to classes they never defined
    "jamba": ("JambaMambaMixer.forward(cache_params)", "recurrent state carried from one step to the next"),
    "zamba2": ("Zamba2MambaMixer.forward(cache_params)", "recurrent state carried from one step to the next"),
    "xlstm": ("xLSTMModel.forward(cache_params)", "recurrent state carried from one step to the next"),
    # one attention module run H_cycles * L_cycles times per token, one KV-cache slot per run: once
    # converted into a port whose single engine Attention per module each run overwrote
    "hrm_text": ("HrmTextAttention.forward: past_key_values.update(", "several KV-cache slots"),
}


@pytest.mark.parametrize("model_type", sorted(BLOCKED))
def test_blocked_dense_decoder_names_file_line_and_construct(model_type, tmp_path):
    where, construct = BLOCKED[model_type]
    proc = run_porter("convert", model_type, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert re.search(rf"modeling_{model_type}\.py:\d+: ", lines[0]), lines[0]
    assert where in lines[0] and construct in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


# model_type -> (modeling file, class or method the line must name, construct in the message): what
# once converted into a port that drops or mistranslates part of the model
REFUSED = {
    # lightning (linear) attention layers keep their state in the HF cache between calls
    "minimax": ("modeling_minimax.py", "MiniMaxLightningAttention.forward", "keeps its own state"),
    # the sparse layers' block mask, built by an indexer from its own projections (the indexer also
    # keeps its own key cache, the refusal it met first before the mask check came)
    "minimax_m3_vl_text": ("modeling_minimax_m3_vl.py", "MiniMaxM3VLAttention.forward",
                           "attention mask computed from the layer's own projections"),
    # (cohere_compass_text, refused here once for its rotary under `if position_embeddings is not
    # None` and its table pre-rotated in place, ports now: PT240 by layer type, PT244)
    # (KV sharing, refused here once, ports now: PT291/PT293, the engine's kv_sharing_target_layer_name;
    # gemma4_unified_text is verified.) gemma3n's AltUp keeps several copies of the hidden states, each
    # projected by its own linear of a list (besides the per-layer inputs)
    "gemma3n_text": ("modeling_gemma3n.py", "class Gemma3nTextModel", "a list of linears under one attribute"),
    # gemma4's shared KV layers and its v taken from k (PT292) port; its mixture of experts does not
    "gemma4_text": ("modeling_gemma4.py", "class Gemma4TextExperts", "per-expert weights without a router"),
    # rotary from a complex table, q and k each viewed as complex pairs (besides its chunked attention,
    # NoPE layers with a temperature-tuned query scale and its input-weighted MoE)
    "llama4_text": ("modeling_llama4.py", "Llama4TextAttention.forward: apply_rotary_emb", "complex pairs"),
}

# (release, model_type) -> (modeling file, where, construct): day-zero models of issue 30 left refused
DAY_ZERO_REFUSED = {
    # (beam, refused here for its rotary choice filled by a loop over the layer types, ports now: PT240, PT161)
    # gated delta-net layers keep a recurrent state (5.24.0 marks the model `_is_stateful`; in 5.25.0
    # PT240 reads its one table handed to the sliding layers, and the layer's own state is what blocks)
    ("5.24.0", "lara_mini"): ("modeling_lara_mini.py", "LaraMiniPreTrainedModel", "recurrent state carried"),
    ("5.25.0", "lara_mini"): ("modeling_lara_mini.py", "LaraMiniGatedDeltaNet.forward", "keeps its own state"),
    # a learned RMSNorm per expert on each route's output before the routes are summed (FusedMoE sums
    # them in its kernel); refused before for its rotary on the sliding layers only, which PT240 reads now
    ("5.25.0", "ergo"): ("modeling_ergo.py", "ErgoExperts.post_expert_norm", "before the weighted sum"),
}


@pytest.mark.parametrize("key", sorted(DAY_ZERO_REFUSED), ids=lambda k: f"{k[1]}-{k[0]}")
def test_refused_day_zero_model_names_file_line_and_construct(key, tmp_path):
    (release, model_type), (src, where, construct) = key, DAY_ZERO_REFUSED[key]
    proc = run_porter("convert", model_type, "--transformers", release, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert re.search(rf"{re.escape(src)}:\d+: ", lines[0]), lines[0]
    assert where in lines[0] and construct in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_refused_text_model_names_file_line_and_construct(model_type, tmp_path):
    src, where, construct = REFUSED[model_type]
    proc = run_porter("convert", model_type, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert re.search(rf"{re.escape(src)}:\d+: ", lines[0]), lines[0]
    assert where in lines[0] and construct in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
