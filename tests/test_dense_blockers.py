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
    # BioGPT's k and v come from either the cache (an encoder-decoder cache's cross-attention arm)
    # or its projections: the dataflow finds no single projection behind them
    "biogpt": ("BioGptAttention.forward", "q/k/v projections not found"),
    # softmax through a module built on the spot (`nn.Softmax(dim=-1)(scores)`): once converted into
    # a port with no engine Attention at all (the engine refused it: no KV-cache group)
    "codegen": ("CodeGenAttention._attn", "attention computed inline"),
    # rotate_half returns cat(x2, -x1): rotary the other way round (once a port 9.28 away from HF)
    "nanochat": ("rotate_half", "rotary that turns the other way"),
    # recurrent state across steps (`_is_stateful`): once converted into ports that dropped the
    # Mamba / xLSTM layers (built through a table, a helper method, or defined under a module-level
    # `if`) and referred to classes they never defined
    "jamba": ("JambaMambaMixer.forward(cache_params)", "recurrent state carried from one step to the next"),
    "zamba2": ("Zamba2MambaMixer.forward(cache_params)", "recurrent state carried from one step to the next"),
    "xlstm": ("xLSTMModel.forward(cache_params)", "recurrent state carried from one step to the next"),
    # one attention module run H_cycles * L_cycles times per token, one KV-cache slot per run: once
    # converted into a port whose single engine Attention per module each run overwrote
    "hrm_text": ("HrmTextAttention.forward: past_key_values.update(", "several KV-cache slots"),
    # experts FusedMoE does not compute (a clamped swiglu over interleaved gate/up, with biases): once
    # ported as the HF per-expert loop, every expert on every rank, which vLLM cannot compile
    "gpt_oss": ("class GptOssExperts", "cannot port mixture of experts"),
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
