"""Phase 3 — the rewrite rules, one per file, grouped by family (attention/, rope/, mlp/, moe/,
norms/, tp/, plumbing/, cleanup/, config/). pipeline.py lists them in the order they run and holds
the one runner; base.py is the Rule base class and the rewrite context."""

from porter.passes.base import REGISTRY, Example, RewriteContext, Rule
from porter.passes.pipeline import MODEL as PASSES

__all__ = ["PASSES", "REGISTRY", "Example", "RewriteContext", "Rule"]
