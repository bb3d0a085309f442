"""PT262 module-list-comprehension: the rule `ModuleListComprehension`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import dotted
from porter.passes.base import Example, Rule


class ModuleListComprehension(Rule):
    descend_methods = frozenset({"__init__"})
    code = "PT262"
    name = "module-list-comprehension"
    why = (
        "Some HF models build their layer list by appending in a loop (`layers = []`, `for i in "
        "range(n): layers.append(Layer(config, i))`, `self.layers = nn.ModuleList(layers)`). The "
        "three statements become the one list comprehension the engine's ports (and porter's other "
        "rules: each layer's `prefix=f\"{prefix}.layers.{i}\"`, which the engine's attention and "
        "state-space layers need unique) are written in; the elements are built in the same order."
    )
    examples = [
        Example(
            "from torch import nn\n\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        layers = []\n"
            "        for i in range(config.num_hidden_layers):\n"
            "            layers.append(Layer(config, layer_idx=i))\n"
            "        self.layers = nn.ModuleList(layers)\n",
            "from torch import nn\n\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.layers = nn.ModuleList([Layer(config, layer_idx=i) for i in range(config.num_hidden_layers)])\n",
        ),
        Example(  # the list read again after the loop: left as it is
            "from torch import nn\n\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        layers = []\n"
            "        for i in range(config.num_hidden_layers):\n"
            "            layers.append(Layer(config, layer_idx=i))\n"
            "        self.first = layers[0]\n"
            "        self.layers = nn.ModuleList(layers)\n",
            "from torch import nn\n\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        layers = []\n"
            "        for i in range(config.num_hidden_layers):\n"
            "            layers.append(Layer(config, layer_idx=i))\n"
            "        self.first = layers[0]\n"
            "        self.layers = nn.ModuleList(layers)\n",
        ),
    ]

    @classmethod
    def applies(cls, ctx) -> bool:
        return "append" in ctx.idx.identifiers or not ctx.idx.identifiers

    def leave_IndentedBlock(self, original, updated):
        if self.current_function != "__init__" or not self.kept(self.current_class) and self.plan.causal_lm:
            return updated
        body = list(updated.body)
        for i in range(len(body) - 2):
            new = self._comprehension(body[i], body[i + 1], body[i + 2])
            if new is not None:
                return updated.with_changes(body=[*body[:i], new, *body[i + 3:]])
        return updated

    @staticmethod
    def _comprehension(start, loop, wrap) -> cst.BaseStatement | None:
        """`NAME = []`, `for T in IT: NAME.append(CALL)`, `self.X = nn.ModuleList(NAME)` -> `self.X =
        nn.ModuleList([CALL for T in IT])`; None when the three statements are not that."""
        if not m.matches(start, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())],
                                                                     value=m.List(elements=[]))])):
            return None
        name = start.body[0].targets[0].target.value
        if not isinstance(loop, cst.For) or loop.orelse is not None or len(loop.body.body) != 1 \
                or not m.matches(loop.body.body[0], m.SimpleStatementLine(body=[m.Expr(m.Call(
                    func=m.Attribute(value=m.Name(name), attr=m.Name("append")), args=[m.Arg(m.Call())]))])):
            return None
        if not m.matches(wrap, m.SimpleStatementLine(body=[m.Assign(
                targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))],
                value=m.Call(args=[m.Arg(m.Name(name))]))])) \
                or (dotted(wrap.body[0].value.func) or "").rsplit(".", 1)[-1] != "ModuleList":
            return None
        call = loop.body.body[0].body[0].value.args[0].value
        comp = cst.ListComp(elt=call, for_in=cst.CompFor(target=loop.target, iter=loop.iter))
        assign = wrap.body[0]
        return wrap.with_changes(body=[assign.with_changes(value=assign.value.with_changes(
            args=[cst.Arg(comp)]))])
