"""PT031 thread-positions: the rule `ThreadPositions`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst

from porter.analysis.cstutil import loop_module, param_names, self_attr
from porter.passes.base import Example, Rule


class ThreadPositions(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT031"
    name = "thread-positions"
    why = (
        "The engine's rotary embedding needs `positions` where attention runs, and HF passed "
        "cos/sin instead. Every module on the path from the base model down to a module that "
        "reads `positions` gets a `positions` parameter and passes it on (`positions=positions`), "
        "found by following sub-module calls (including `for layer in self.layers`)."
    )
    examples = [
        Example(
            "from torch import nn\n\n\nclass Attn(nn.Module):\n    def forward(self, x, positions):\n        return x\n\n\nclass Layer(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n        self.self_attn = Attn(config)\n\n    def forward(self, x, scale=1.0):\n        return self.self_attn(x) * scale\n\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n        self.layers = nn.ModuleList([Layer(config) for _ in range(2)])\n\n    def forward(self, x, positions):\n        for layer in self.layers:\n            x = layer(x)\n        return x\n",
            "from torch import nn\n\n\nclass Attn(nn.Module):\n    def forward(self, x, positions):\n        return x\n\n\nclass Layer(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n        self.self_attn = Attn(config)\n\n    def forward(self, x, positions: torch.Tensor, scale=1.0):\n        return self.self_attn(x, positions=positions) * scale\n\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n        self.layers = nn.ModuleList([Layer(config) for _ in range(2)])\n\n    def forward(self, x, positions):\n        for layer in self.layers:\n            x = layer(x, positions=positions)\n        return x\n",
            seed={"needs_positions": {"Attn"}},
        )
    ]

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self._needs = self._closure()

    def _callee_classes(self, cls: str) -> dict[str, str]:
        info = self.ctx.idx.classes.get(cls)
        return {a: s.ctor for a, s in info.submodules.items()} if info else {}

    def _closure(self) -> set[str]:
        needs = set(self.ctx.needs_positions)
        changed = True
        while changed:
            changed = False
            for cls in self.plan.classes:
                if cls in needs:
                    continue
                if any(c in needs for c in self._callee_classes(cls).values()):
                    needs.add(cls)
                    changed = True
        return needs

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        if cls not in self._needs or len(self.scope) != 1 or updated.name.value != "forward":
            return updated
        if "positions" in param_names(updated):
            return updated
        params = list(updated.params.params)
        # after the required parameters: positional callers keep working, callers pass positions=
        at = next((i for i, p in enumerate(params) if p.default is not None), len(params))
        params.insert(
            at,
            cst.Param(
                cst.Name("positions"),
                annotation=cst.Annotation(cst.parse_expression("torch.Tensor")),
            ),
        )
        params = [p.with_changes(comma=cst.MaybeSentinel.DEFAULT) for p in params]
        self.mark(f"{cls}.forward")
        return updated.with_changes(params=updated.params.with_changes(params=params))

    def visit_For(self, node: cst.For) -> None:
        bound = loop_module(node)
        if bound:
            self._loop_vars = getattr(self, "_loop_vars", {})
            self._loop_vars[bound[0]] = bound[1]

    def leave_Call(self, original, updated):
        cls = self.current_class
        if cls not in self._needs or self.current_function != "forward":
            return updated
        callees = self._callee_classes(cls)
        attr = self_attr(updated.func)
        if attr is None and isinstance(updated.func, cst.Name):
            attr = getattr(self, "_loop_vars", {}).get(updated.func.value)
        if attr is None or callees.get(attr) not in self._needs:
            return updated
        if any(a.keyword is not None and a.keyword.value == "positions" for a in updated.args):
            return updated
        args = [a.with_changes(comma=cst.MaybeSentinel.DEFAULT) for a in updated.args]
        args.append(
            cst.Arg(
                cst.Name("positions"),
                keyword=cst.Name("positions"),
                equal=cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace("")),
            )
        )
        return updated.with_changes(args=args)
