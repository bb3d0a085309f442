"""PT030 unwrap-outputs: the rule `UnwrapOutputs`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst

from porter.passes.base import Example, Rule


class UnwrapOutputs(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT030"
    name = "unwrap-outputs"
    why = (
        "HF modules return output dataclasses (`BaseModelOutputWithPast(last_hidden_state=h, ...)`); "
        "engine modules return the hidden-states tensor itself. `return X(last_hidden_state=h, ...)` "
        "becomes `return h`, and `out.last_hidden_state` becomes `out`."
    )
    examples = [
        Example(
            "class A(nn.Module):\n    def forward(self, x):\n        out = self.m(x)\n"
            "        return Out(last_hidden_state=out.last_hidden_state, past_key_values=None)\n",
            "class A(nn.Module):\n    def forward(self, x):\n        out = self.m(x)\n        return out\n",
        )
    ]

    def leave_Return(self, original, updated):
        if not self.kept(self.current_class) or not isinstance(updated.value, cst.Call):
            return updated
        field = self.ctx.table.output_field
        for arg in updated.value.args:
            if arg.keyword is not None and arg.keyword.value == field:
                return updated.with_changes(value=arg.value)
        return updated

    def leave_Attribute(self, original, updated):
        if self.kept(self.current_class) and updated.attr.value == self.ctx.table.output_field:
            return updated.value
        return updated
