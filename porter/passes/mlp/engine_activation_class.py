"""PT140 engine-activation-class: the rule `EngineActivationClass`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst

from porter.passes.base import Example, Rule
from porter.analysis.layouts import table_activation_class


class EngineActivationClass(Rule):
    code = "PT140"
    name = "engine-activation-class"
    why = (
        "`ACT2CLS[\"xielu\"](...)` builds an activation with learned parameters (xIELU's alpha_p, "
        "alpha_n, and the beta/eps buffers the checkpoint carries). The key is a constant, so the "
        "class is known statically: the engine's class of the same activation (rules/targets.yaml "
        "`act_class_<key>`) takes the same arguments and holds the same parameter names, so the "
        "checkpoint loads unchanged. A key the target table does not list stays a blocker."
    )
    examples = [
        Example(
            "class A(nn.Module):\n    def __init__(self, config):\n"
            "        self.act = ACT2CLS[\"xielu\"](dtype=config.dtype)\n",
            "class A(nn.Module):\n    def __init__(self, config):\n"
            "        self.act = XIELU(dtype=config.dtype)\n",
        )
    ]
    descend_methods = frozenset({"__init__"})

    def leave_Call(self, original, updated):
        if not self.kept(self.current_class):
            return updated
        key = table_activation_class(updated.func)
        if key is None or f"act_class_{key}" not in self.ctx.target.symbols:
            return updated
        return updated.with_changes(func=cst.Name(self.ctx.use(f"act_class_{key}")))
