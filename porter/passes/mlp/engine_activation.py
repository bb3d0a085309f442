"""PT028 engine-activation: the rule `EngineActivation`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import dotted
from porter.passes.base import Example, Rule


class EngineActivation(Rule):
    code = "PT028"
    name = "engine-activation"
    why = ("`ACT2FN[name]` is transformers' table (`get_activation(name)` looks it up); the engine's "
           "`get_act_fn(name)` gives its own kernels.")
    examples = [
        Example(
            "class A(nn.Module):\n    def __init__(self, config):\n        self.act = ACT2FN[config.act]\n",
            "class A(nn.Module):\n    def __init__(self, config):\n        self.act = get_act_fn(config.act)\n",
        ),
        Example(
            "from ...activations import get_activation\n\n\nclass A(nn.Module):\n"
            "    def __init__(self, config):\n        self.act = get_activation(config.act)\n",
            "from ...activations import get_activation\n\n\nclass A(nn.Module):\n"
            "    def __init__(self, config):\n        self.act = get_act_fn(config.act)\n",
        ),
    ]

    def leave_Subscript(self, original, updated):
        if self.kept(self.current_class) and m.matches(updated.value, m.Name("ACT2FN")):
            return cst.Call(func=cst.Name(self.ctx.use("get_act_fn")), args=[cst.Arg(updated.slice[0].slice.value)])
        return updated

    def leave_Call(self, original, updated):
        if self.kept(self.current_class) and len(updated.args) == 1 and updated.args[0].keyword is None \
                and (self.ctx.idx.qualify(dotted(updated.func)) or "").endswith("activations.get_activation"):
            return updated.with_changes(func=cst.Name(self.ctx.use("get_act_fn")))
        return updated
