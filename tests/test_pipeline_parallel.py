"""End to end: a port that rules PT320/PT321 split into pipeline stages runs in vLLM with
pipeline_parallel_size=2 and equals HF on the tiny checkpoint (logprobs within the threshold, the
same greedy tokens), as `porter verify` compares a port at TP=1: the port converted fresh from its
transformers source, one engine start. (The port at TP=1 is the committed port's verdict.)"""

from __future__ import annotations

import pytest

from porter.verify import THRESHOLD

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("model_type", ["llama", "mixtral", "gpt2", "bloom", "dbrx", "gpt_bigcode"])
def test_port_in_two_pipeline_stages_matches_hf(tmp_path, model_type):
    from porter.convert import convert
    from porter.layout import PortInfo
    from porter.verify import hf_side
    from porter.verify.compare import compare
    from porter.verify.engine import run_engine

    (conv,) = convert(model_type, ["vllm"], tmp_path / "ports")
    assert any(r.startswith("PT320") for r in conv.rules_applied), conv.rules_applied
    assert any(r.startswith("PT321") for r in conv.rules_applied), conv.rules_applied
    port = tmp_path / "ports" / "vllm" / model_type
    info = PortInfo.load(port)
    info.path = port
    hf = hf_side(info, tmp_path)
    spec, prompts = hf.spec, hf.prompts
    ckpt = hf.checkpoint(tmp_path / "ckpt", info.architecture)
    two = run_engine(ckpt, 1, prompts, pp=2, port=info, max_tokens=spec.max_new_tokens,
                     top_logprobs=spec.top_logprobs, max_model_len=256)
    assert two.ok, (two.error, two.log_tail[-3000:])
    assert two.compilation_mode not in (None, "NONE")  # traced: the CPU runner's PP path
    # two stages, each holding its own half of the layers (a port without PT320 holds them all)
    stages = sorted(tuple(w["pp_stage"][1]) for w in two.workers)
    assert len(stages) == 2 and stages[0][0] == 0 and stages[0][1] == stages[1][0] < stages[1][1], two.workers
    assert [r["prompt"] for r in two.results] == prompts
    # HF teacher-forced along the engine's own sequences, as porter verify compares
    rows = hf.logprobs([list(r["prompt"]) + list(r["tokens"]) for r in two.results])
    c = compare(rows, [r["tokens"] for r in hf.refs], two.results, spec.top_logprobs, THRESHOLD)
    print(f"{model_type}: PP=2 vs HF max |Δ| = {c.max_delta:.2e}")
    assert c.tokens_equal, c.first_token_diff
    assert c.max_delta <= THRESHOLD, str(c.first_over)
