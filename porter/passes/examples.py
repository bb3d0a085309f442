"""Run one rule on a snippet: how a rule's before/after examples are checked (and shown)."""

from __future__ import annotations

import libcst as cst

from porter.analysis.index import build_index, parse
from porter.passes.base import RewriteContext, Rule
from porter.passes.pipeline import run
from porter.plan import build_plan
from porter.rules_data import get_target, strip_table


def apply_rule(rule_cls: type[Rule], before: str, target: str = "vllm", seed: dict | None = None) -> str:
    """Index and plan the snippet (every class counts as kept), then run only this rule."""
    if hasattr(rule_cls, "example_context"):  # a rule over a configuration module (passes/config/)
        ctx = rule_cls.example_context()  # type: ignore[attr-defined]
        return run([rule_cls], cst.parse_module(before), ctx, path="<example>").code
    module = parse(before, "<example>")
    idx = build_index(module, "<example>")
    plan = build_plan(idx, strip_table(), "example", "<example>", partial=True)
    ctx = RewriteContext(idx=idx, plan=plan, table=strip_table(), target=get_target(target))
    for key, value in (seed or {}).items():
        target = ctx if hasattr(ctx, key) else plan  # plan: a fact the snippet cannot show
        current = getattr(target, key)
        if hasattr(current, "update"):
            current.update(value)
        else:
            setattr(target, key, value)
    assert rule_cls.applies(ctx), f"{rule_cls.code}: applies() is False on this example"
    return run([rule_cls], module, ctx, path="<example>").code
