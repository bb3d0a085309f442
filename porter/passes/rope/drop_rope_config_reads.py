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


def _arithmetic(e: cst.BaseExpression) -> bool:
    """Computed from attributes and numbers alone: arithmetic and int()/float() (no call that could act)."""
    if isinstance(e, (cst.Attribute, cst.Name, cst.Integer, cst.Float)):
        return True
    if isinstance(e, cst.BinaryOperation):
        return _arithmetic(e.left) and _arithmetic(e.right)
    if isinstance(e, cst.Call) and m.matches(e.func, m.Name("int") | m.Name("float")):
        return all(a.keyword is None and _arithmetic(a.value) for a in e.args)
    return False


class DropRopeConfigReads(Rule):
    descend_methods = frozenset({"__init__"})
    code = "PT036"
    name = "drop-rope-config-reads"
    why = (
        "transformers 4.x attentions copy rotary settings from the config (`self.rope_theta = "
        "config.rope_theta`) for the rotary module they build. The engine's rotary (PT040) reads them "
        "from `config.rope_parameters`, where transformers 5 (the engine's) keeps them: its configs have "
        "no `rope_theta` field. Such a copy that nothing in the port reads any more is dropped, or a size "
        "computed from one (4.x GPT-NeoX-Japanese's `self.rotary_ndims = int(self.head_size * config.rotary_pct)`); "
        "the fields are data (rules/hf_strip.yaml: rope_config_fields)."
    )
    examples = [
        Example(
            "class Attn(nn.Module):\n    def __init__(self, config):\n        self.rope_theta = config.rope_theta\n"
            "        self.head_dim = 8\n",
            "class Attn(nn.Module):\n    def __init__(self, config):\n        self.head_dim = 8\n",
        ),
        Example(  # a rotary width computed from a 4.x field (GPT-NeoX-Japanese's rotary_pct), read by nothing now
            "class Attn(nn.Module):\n    def __init__(self, config):\n"
            "        self.rotary_ndims = int(self.head_size * config.rotary_pct)\n        self.head_dim = 8\n",
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
                targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))])])):
            return updated
        a = updated.body[0]
        fields = {r.attr.value for r in findall(a.value, m.Attribute(value=m.Name("config")))}  # type: ignore[attr-defined]
        if fields and fields <= set(self.ctx.table.rope_config_fields) and _arithmetic(a.value) \
                and a.targets[0].target.attr.value not in self._read:  # type: ignore[attr-defined]
            self.mark(f"{self.current_class}.__init__")
            return cst.RemoveFromParent()
        return updated
