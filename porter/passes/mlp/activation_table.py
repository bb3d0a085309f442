"""PT143 activation-table: the rule `ActivationTable`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import findall
from porter.passes.base import Example, Rule


class ActivationTable(Rule):
    code = "PT143"
    name = "activation-table"
    why = (
        "A model's own table of activations (OpenAI GPT's `ACT_FNS = {\"relu\": nn.ReLU(), \"gelu\": "
        "gelu_new, ...}`, read as `ACT_FNS[config.afn]`) holds transformers' functions, each "
        "`get_activation(<its name>)`, and torch modules. The table becomes one of names (a torch "
        "module `nn.X()` is the engine's `x`) and each lookup `get_act_fn(ACT_FNS[...])`: the engine's "
        "kernels, built where the model is built (never at import). Only a table every use of which "
        "is such a lookup."
    )
    examples = [
        Example(
            "from ...activations import gelu_new, silu\n\n"
            "ACT_FNS = {\"relu\": nn.ReLU(), \"silu\": silu, \"gelu\": gelu_new}\n\n\n"
            "class A(nn.Module):\n    def __init__(self, config):\n        self.act = ACT_FNS[config.afn]\n",
            "from ...activations import gelu_new, silu\n\n"
            "ACT_FNS = {\"relu\": \"relu\", \"silu\": \"silu\", \"gelu\": \"gelu_new\"}\n\n\n"
            "class A(nn.Module):\n    def __init__(self, config):\n        self.act = get_act_fn(ACT_FNS[config.afn])\n",
        ),
    ]

    def _name_of(self, e: cst.BaseExpression) -> str | None:
        """`gelu_new` imported from transformers' activations -> "gelu_new"; `nn.ReLU()` -> "relu"."""
        if isinstance(e, cst.Name) and (self.ctx.idx.qualify(e.value) or "").endswith(f"activations.{e.value}"):
            return e.value
        if m.matches(e, m.Call(func=m.Attribute(value=m.Name("nn")), args=[])):
            return e.func.attr.value.lower()  # type: ignore[attr-defined]
        return None

    def visit_Module(self, node):
        self._tables: dict[str, dict[int, str]] = {}  # table name -> id(value) -> activation name
        for st in node.body:
            if not m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())], value=m.Dict())])):
                continue
            a = st.body[0]  # type: ignore[attr-defined]
            names = {id(el.value): self._name_of(el.value) for el in a.value.elements}
            if not names or None in names.values() or not any(isinstance(el.value, cst.Name) for el in a.value.elements):
                continue
            table = a.targets[0].target.value
            uses = [n for n in findall(node, m.Name(table))]
            subs = findall(node, m.Subscript(value=m.Name(table)))
            if len(uses) == len(subs) + 1:  # its definition, then lookups only
                self._tables[table] = names  # type: ignore[assignment]
        return True

    def leave_DictElement(self, original, updated):
        for names in getattr(self, "_tables", {}).values():
            if id(original.value) in names:
                self.mark()
                return updated.with_changes(value=cst.SimpleString(f'"{names[id(original.value)]}"'))
        return updated

    def leave_Subscript(self, original, updated):
        if isinstance(updated.value, cst.Name) and updated.value.value in getattr(self, "_tables", {}):
            self.mark()
            return cst.Call(func=cst.Name(self.ctx.use("get_act_fn")), args=[cst.Arg(updated)])
        return updated
