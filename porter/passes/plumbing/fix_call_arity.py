"""PT032 fix-call-arity: the rule `FixCallArity`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import assigned_names, loop_module, self_attr
from porter.passes.base import Example, Rule


class FixCallArity(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT032"
    name = "fix-call-arity"
    why = (
        "A sub-module whose forward returned `(output, attn_weights)` now returns the output "
        "alone (weights were HF-only), so callers that unpacked `h, _ = self.self_attn(...)` "
        "bind `h = self.self_attn(...)`."
    )
    examples = [
        Example(
            "class Layer(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n        self.self_attn = Attn(config)\n\n    def forward(self, x):\n        h, _ = self.self_attn(x)\n        return h\n",
            "class Layer(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n        self.self_attn = Attn(config)\n\n    def forward(self, x):\n        h = self.self_attn(x)\n        return h\n",
            seed={"single_return": {"Attn"}},
        )
    ]

    def visit_FunctionDef(self, node):
        self._single: set[str] = set()
        self._loop_vars: dict[str, str] = {}
        return super().visit_FunctionDef(node)

    def visit_For(self, node: cst.For) -> None:
        bound = loop_module(node)
        if bound:
            self._loop_vars[bound[0]] = bound[1]

    def leave_Assign(self, original, updated):
        cls = self.current_class
        info = self.ctx.idx.classes.get(cls or "")
        if not info or not isinstance(updated.value, cst.Call) or len(updated.targets) != 1:
            return updated
        attr = self_attr(updated.value.func)
        if attr is None and isinstance(updated.value.func, cst.Name):
            attr = self._loop_vars.get(updated.value.func.value)  # `for layer in self.layers: out = layer(h)`
        sub = info.submodules.get(attr or "")
        target = updated.targets[0].target
        if sub and sub.ctor in self.ctx.single_return and isinstance(target, cst.Tuple):
            names = [n for el in target.elements for n in assigned_names(el.value)]
            return updated.with_changes(targets=[cst.AssignTarget(cst.Name(names[0]))])
        if sub and sub.ctor in self.ctx.single_return and isinstance(target, cst.Name):
            self._single.add(target.value)  # `outputs = layer(h); h = outputs[0]`
        return updated

    def leave_Subscript(self, original, updated):
        if m.matches(updated, m.Subscript(value=m.Name(), slice=[m.SubscriptElement(m.Index(m.Integer("0")))])) \
                and updated.value.value in getattr(self, "_single", ()):  # type: ignore[attr-defined]
            return updated.value
        return updated
