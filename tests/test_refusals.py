"""Every refusal of the planner (porter/plan/refusals.py) has a bad input that triggers it: planned,
the example fails with that refusal's one line (file:line, construct, rule)."""

from __future__ import annotations

import pytest

from porter.analysis.index import build_index, parse
from porter.errors import PorterError
from porter.plan import build_plan
import porter.plan.head_pair_refusals  # noqa: F401 - its refusals join REFUSALS
import porter.plan.latent_refusals  # noqa: F401 - its refusals join REFUSALS
import porter.plan.linear_list_refusals  # noqa: F401 - its refusals join REFUSALS
import porter.plan.rotary_refusals  # noqa: F401 - its refusals join REFUSALS
import porter.plan.routed_heads  # noqa: F401 - its refusals join REFUSALS
import porter.plan.score_bias_refusals  # noqa: F401 - its refusals join REFUSALS
from porter.plan.refusals import REFUSALS
from porter.rules_data import strip_table


def test_every_refusal_has_an_example():
    assert REFUSALS and all(r.example.strip() for r in REFUSALS)
    assert len({r.reason for r in REFUSALS}) == len(REFUSALS)


@pytest.mark.parametrize("refusal", REFUSALS, ids=lambda r: r.reason[:40])
def test_refusal_example_fails_with_its_line(refusal):
    idx = build_index(parse(refusal.example, "<example>"), "<example>", refusal.example)
    with pytest.raises(PorterError) as err:
        build_plan(idx, strip_table(), "example", "<example>", partial=not refusal.whole_file)
    assert str(err.value) == refusal.says
    assert "\n" not in str(err.value)


def test_a_softmax_in_a_method_forward_never_reaches_is_not_attention():
    """Remote code's causal LM samples in its own generation helpers (ChatGLM3's
    `stream_generate`: softmax over the logits): only what forward reaches is read for inline
    attention, so the same file with such a helper plans as without it."""
    from porter.plan.refusals import ATTENTION_INLINE

    base = ATTENTION_INLINE.example
    helper = ("\n    def forward(self, x):\n        return self.lm_head(self.model(x))\n\n"
              "    def stream_generate(self, x):\n        return torch.softmax(self.forward(x), dim=-1)\n")
    # the example's inline attention refused in Attn.forward, as ever ...
    fixed = base.replace("return torch.softmax(q @ q.T, dim=-1) @ q", "return q")
    for text, refused in ((base + helper, True), (fixed + helper, False)):
        idx = build_index(parse(text, "<example>"), "<example>", text)
        try:
            build_plan(idx, strip_table(), "example", "<example>", partial=False)
            got = None
        except PorterError as e:
            got = str(e)
        if refused:
            assert got is not None and "Attn.forward: torch.softmax" in got, got
        else:
            assert got is None or "attention computed inline" not in got, got
