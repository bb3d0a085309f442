"""PT013 drop-batch-collapse: the rule `DropBatchCollapse`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.passes.base import Example, Rule


class DropBatchCollapse(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT013"
    name = "drop-batch-collapse"
    why = (
        "HF collapses leading batch dimensions with `x = x.view(-1, x.shape[-1])` (or "
        "`reshape(-1, x.size(-1))`). The engine's tensors are already flat (`[num_tokens]`, "
        "`[num_tokens, hidden]`), where this is at best a no-op and, on 1-D token ids, adds a "
        "dimension. The self-assignment is removed."
    )
    examples = [
        Example(
            "class A(nn.Module):\n    def forward(self, input_ids):\n"
            "        input_ids = input_ids.view(-1, input_ids.shape[-1])\n        return self.e(input_ids)\n",
            "class A(nn.Module):\n    def forward(self, input_ids):\n        return self.e(input_ids)\n",
        )
    ]

    def _collapse(self, value: cst.BaseExpression, name: str) -> bool:
        last = m.Subscript(value=m.Attribute(value=m.Name(name), attr=m.Name("shape")),
                           slice=[m.SubscriptElement(m.Index(m.UnaryOperation(operator=m.Minus(), expression=m.Integer("1"))))])
        last |= m.Call(func=m.Attribute(value=m.Name(name), attr=m.Name("size")),
                       args=[m.Arg(m.UnaryOperation(operator=m.Minus(), expression=m.Integer("1")))])
        return m.matches(value, m.Call(
            func=m.Attribute(value=m.Name(name), attr=m.Name("view") | m.Name("reshape")),
            args=[m.Arg(m.UnaryOperation(operator=m.Minus(), expression=m.Integer("1"))), m.Arg(last)]))

    def leave_SimpleStatementLine(self, original, updated):
        if not self.kept(self.current_class) or self.current_function != "forward":
            return updated
        if m.matches(updated, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())])])):
            assign = updated.body[0]
            name = assign.targets[0].target.value  # type: ignore[attr-defined]
            if self._collapse(assign.value, name):  # type: ignore[attr-defined]
                return cst.RemoveFromParent()
        return updated

    def leave_If(self, original, updated):
        # `if input_ids is not None: input_ids = input_ids.view(...)` leaves an empty block
        if self.kept(self.current_class) and self.current_function == "forward" and len(original.body.body) == 1 \
                and original.orelse is None:
            st = original.body.body[0]
            if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())])])):
                assign = st.body[0]  # type: ignore[attr-defined]
                if self._collapse(assign.value, assign.targets[0].target.value):
                    return cst.RemoveFromParent()
        return updated
