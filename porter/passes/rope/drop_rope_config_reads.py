"""PT036 drop-rope-config-reads: the rule `DropRopeConfigReads`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import findall
from porter.passes.base import Example, Rule

_KEEP = (
    "class Attn(nn.Module):\n    def __init__(self, config):\n        self.rope_theta = config.rope_theta\n\n"
    "    def forward(self, x):\n        return x * self.rope_theta\n"
)


class DropRopeConfigReads(Rule):
    descend_methods = frozenset({"__init__"})
    code = "PT036"
    name = "drop-rope-config-reads"
    why = (
        "transformers 4.x attentions copy rotary settings from the config (`self.rope_theta = "
        "config.rope_theta`) for the rotary module they build. The engine's rotary (PT040) reads them "
        "from `config.rope_parameters`, where transformers 5 (the engine's) keeps them: its configs have "
        "no `rope_theta` field. Such a copy that nothing in the port reads any more is dropped; the "
        "fields are data (rules/hf_strip.yaml: rope_config_fields)."
    )
    examples = [
        Example(
            "class Attn(nn.Module):\n    def __init__(self, config):\n        self.rope_theta = config.rope_theta\n"
            "        self.head_dim = 8\n",
            "class Attn(nn.Module):\n    def __init__(self, config):\n        self.head_dim = 8\n",
        ),
        Example(_KEEP, _KEEP),  # must leave unchanged: the port still reads it
    ]

    def visit_Module(self, node: cst.Module) -> bool | None:
        # every `.X` the module reads (not the assignment targets)
        targets = {id(t.target) for t in findall(node, m.AssignTarget())}
        self._read = {a.attr.value for a in findall(node, m.Attribute(value=m.Name("self")))  # type: ignore[attr-defined]
                      if id(a) not in targets}
        return True

    def leave_SimpleStatementLine(self, original, updated):
        if self.current_function != "__init__" or not m.matches(updated, m.SimpleStatementLine(body=[m.Assign(
                targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))],
                value=m.Attribute(value=m.Name("config")))])):
            return updated
        a = updated.body[0]
        field = a.value.attr.value  # type: ignore[attr-defined]
        if field in self.ctx.table.rope_config_fields and a.targets[0].target.attr.value not in self._read:  # type: ignore[attr-defined]
            self.mark(f"{self.current_class}.__init__")
            return cst.RemoveFromParent()
        return updated
