"""Every registered rule carries before/after examples; this one test runs them all."""

from __future__ import annotations

import pytest

from porter.passes import REGISTRY
from porter.passes.examples import apply_rule
from porter.passes.pipeline import PIPELINE

CASES = [
    pytest.param(rule, i, ex, id=f"{rule.code}-{rule.name}-{i}")
    for rule in REGISTRY.values()
    for i, ex in enumerate(rule.examples)
]


@pytest.mark.parametrize("rule,i,example", CASES)
def test_rule_example(rule, i, example):
    assert apply_rule(rule, example.before, seed=example.seed) == example.after


def test_every_rule_has_examples_and_a_why():
    for rule in REGISTRY.values():
        assert rule.code and rule.name and len(rule.why) > 40, rule
        assert rule.examples, f"{rule.code} {rule.name} carries no examples"


def test_every_pass_is_registered_once():
    assert len({r.code for r in PIPELINE}) == len(PIPELINE)
    assert set(PIPELINE) <= set(REGISTRY.values())
