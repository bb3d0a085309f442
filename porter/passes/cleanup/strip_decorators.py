"""PT002 strip-decorators: the rule `StripDecorators`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst

from porter.analysis.cstutil import dotted
from porter.passes.base import Example, Rule


class StripDecorators(Rule):
    descend_methods = frozenset()
    code = "PT002"
    name = "strip-decorators"
    why = (
        "HF decorators (`@auto_docstring`, `@can_return_tuple`, kernel-hub hooks, output capture) "
        "wrap forward for HF's own plumbing. The engine calls forward directly; the list is data "
        "(rules/hf_strip.yaml: drop_decorators)."
    )
    examples = [
        Example(
            "@auto_docstring\nclass A(nn.Module):\n    @can_return_tuple\n    def forward(self, x):\n        return x\n",
            "class A(nn.Module):\n    def forward(self, x):\n        return x\n",
        )
    ]

    def _keep(self, dec: cst.Decorator) -> bool:
        target = dec.decorator.func if isinstance(dec.decorator, cst.Call) else dec.decorator
        name = dotted(target) or ""
        return name.split(".")[-1] not in self.ctx.table.drop_decorators

    def _strip(self, updated):
        kept = [d for d in updated.decorators if self._keep(d)]
        if len(kept) == len(updated.decorators):
            return updated
        return updated.with_changes(decorators=kept)

    def leave_ClassDef(self, original, updated):
        super().leave_ClassDef(original, updated)
        return self._strip(updated)

    def leave_FunctionDef(self, original, updated):
        super().leave_FunctionDef(original, updated)
        return self._strip(updated)
