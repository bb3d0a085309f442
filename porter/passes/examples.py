"""Run one rule on a snippet: how a rule's before/after examples are checked (and shown)."""

from __future__ import annotations

import dataclasses

import libcst as cst

from porter.analysis.index import build_index, parse
from porter.passes.base import RewriteContext, Rule
from porter.passes.pipeline import run
from porter.plan import build_plan
from porter.plan.model import seal
from porter.rules_data import get_target, strip_table


def apply_rule(rule_cls: type[Rule], before: str, target: str = "vllm", seed: dict | None = None) -> str:
    """Index and plan the snippet (every class counts as kept), then run only this rule."""
    if hasattr(rule_cls, "example_context"):  # a rule over a configuration module (passes/config/)
        ctx = rule_cls.example_context()  # type: ignore[attr-defined]
        return run([rule_cls], cst.parse_module(before), ctx, path="<example>").code
    module = parse(before, "<example>")
    idx = build_index(module, "<example>")
    plan = build_plan(idx, strip_table(), "example", "<example>", partial=True)
    # a fact of the plan the snippet cannot show: the plan with it, sealed again
    recorded = {f.name for f in dataclasses.fields(RewriteContext)}
    plan_seed = {k: v for k, v in (seed or {}).items() if k not in recorded}
    if plan_seed:
        plan = seal(dataclasses.replace(plan, **{
            k: {**getattr(plan, k), **v} if isinstance(v, dict) else v for k, v in plan_seed.items()}))
    ctx = RewriteContext(idx=idx, plan=plan, table=plan.strip, target=get_target(target))
    for key, value in (seed or {}).items():
        if key not in plan_seed:
            getattr(ctx, key).update(value)  # what an earlier rule would have recorded
    assert rule_cls.applies(ctx), f"{rule_cls.code}: applies() is False on this example"
    return run([rule_cls], module, ctx, path="<example>").code
