"""The plan is finished by the planner and sealed: the passes read it and cannot change it, and
PORT.json records it without the facts derived for the passes."""

from __future__ import annotations

import dataclasses

import pytest

from porter.analysis.index import build_index, parse
from porter.plan import build_plan
from porter.plan.refusals import attention_example
from porter.rules_data import strip_table


@pytest.fixture(scope="module")
def plan():
    text = attention_example(init="        self.q_norm = RMSNorm(32)\n", forward="        q = self.q_norm(q)\n")
    idx = build_index(parse(text, "<snippet>"), "<snippet>", text)
    return build_plan(idx, strip_table(), "example", "<snippet>", partial=True)


def test_the_plan_is_sealed(plan):
    attn = plan.attention("Attn")
    assert attn is not None and attn.q == "q_proj"
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.architecture = "Other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        attn.num_heads = "1"
    with pytest.raises(AttributeError):
        plan.linears.append(None)  # a tuple now
    with pytest.raises(TypeError):
        plan.norms["X"] = "RMSNorm"


def test_derived_facts_stay_out_of_port_json(plan):
    assert plan.strip is not None and "Attn" in plan.head_norms
    d = plan.to_dict()
    assert not {"strip", "head_norms", "layout_helpers", "position_factors", "alibi_tests"} & set(d)
    assert d["attentions"][0]["q"] == "q_proj"


def test_a_copy_with_a_change_is_a_new_plan(plan):
    other = dataclasses.replace(plan, top_classes=["AModel"])
    assert other.top_classes == ["AModel"] and plan.top_classes == ()
