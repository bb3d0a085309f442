"""Every refusal of the planner (porter/plan/refusals.py) has a bad input that triggers it: planned,
the example fails with that refusal's one line (file:line, construct, rule)."""

from __future__ import annotations

import pytest

from porter.analysis.index import build_index, parse
from porter.errors import PorterError
from porter.plan import build_plan
import porter.plan.head_pair_refusals  # noqa: F401 - its refusals join REFUSALS
import porter.plan.latent_refusals  # noqa: F401 - its refusals join REFUSALS
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
