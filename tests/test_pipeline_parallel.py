"""End to end: a port that rules PT320/PT321 split into pipeline stages runs in vLLM with
pipeline_parallel_size=2 and gives the tokens and logprobs it gives at TP=1 (one engine each, the
same tiny checkpoint, the port converted fresh from its transformers source)."""

from __future__ import annotations

import pytest

from porter.verify import THRESHOLD

pytestmark = pytest.mark.e2e


def _max_delta(a: list[dict], b: list[dict]) -> float:
    """The largest |Δ| between two runs' logprobs (prompt and decode), over every token id either
    returned at a position; an id one run lacks counts as infinite."""
    worst = 0.0
    for ra, rb in zip(a, b, strict=True):
        assert ra["prompt"] == rb["prompt"]
        for key in ("prompt_logprobs", "logprobs"):
            assert len(ra[key]) == len(rb[key]), key
            for pa, pb in zip(ra[key], rb[key]):
                pa, pb = pa or {}, pb or {}
                for tid in set(pa) | set(pb):
                    if tid not in pa or tid not in pb:
                        return float("inf")
                    worst = max(worst, abs(pa[tid][0] - pb[tid][0]))
    return worst


@pytest.mark.parametrize("model_type", ["llama", "mixtral", "gpt2", "bloom", "dbrx", "gpt_bigcode"])
def test_port_in_two_pipeline_stages_matches_one(tmp_path, model_type):
    from porter.convert import convert
    from porter.layout import PortInfo
    from porter.verify import hf_side
    from porter.verify.engine import run_engine

    (conv,) = convert(model_type, ["vllm"], tmp_path / "ports")
    assert any(r.startswith("PT320") for r in conv.rules_applied), conv.rules_applied
    assert any(r.startswith("PT321") for r in conv.rules_applied), conv.rules_applied
    port = tmp_path / "ports" / "vllm" / model_type
    info = PortInfo.load(port)
    info.path = port
    hf = hf_side(info, tmp_path)
    ckpt = hf.checkpoint(tmp_path / "ckpt", info.architecture)
    kw = dict(port=info, max_tokens=8, top_logprobs=5, max_model_len=256)
    one = run_engine(ckpt, 1, hf.prompts, **kw)
    assert one.ok, one.error
    two = run_engine(ckpt, 1, hf.prompts, pp=2, **kw)
    assert two.ok, (two.error, two.log_tail[-3000:])
    assert two.compilation_mode not in (None, "NONE")  # traced: the CPU runner's PP path
    # two stages, each holding its own half of the layers (a port without PT320 holds them all)
    stages = sorted(tuple(w["pp_stage"][1]) for w in two.workers)
    assert len(stages) == 2 and stages[0][0] == 0 and stages[0][1] == stages[1][0] < stages[1][1], two.workers
    assert [r["tokens"] for r in two.results] == [r["tokens"] for r in one.results]
    delta = _max_delta(one.results, two.results)
    print(f"{model_type}: PP=2 vs TP=1 max |Δ| = {delta:.2e}")
    assert delta <= THRESHOLD, delta
