"""PT024 fuse-gate-up: the rule `FuseGateUp`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, self_call_attr
from porter.passes.base import Example, Rule
from porter.analysis.layouts import linear_args


def _assign_attr(st: cst.CSTNode) -> str | None:
    if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(
            target=m.Attribute(value=m.Name("self"), attr=m.Name()))])])):
        return st.body[0].targets[0].target.attr.value  # type: ignore[attr-defined]
    return None


_UNCHANGED_PT024 = (
    'from torch import nn\n'
    '\n'
    '\n'
    'class MLP(nn.Module):\n'
    '    def __init__(self, config):\n'
    '        super().__init__()\n'
    '        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)\n'
    '        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)\n'
    '        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)\n'
    '        self.act_fn = ACT2FN[config.hidden_act]\n'
    '\n'
    '    def forward(self, x):\n'
    '        return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))\n'
)


class FuseGateUp(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT024"
    name = "fuse-gate-up"
    why = (
        "A gated MLP `down(act(gate(x)) * up(x))` becomes one `MergedColumnParallelLinear` "
        "(`gate_up_proj`, checkpoint shards 0 and 1) and the engine's fused act-and-mul kernel: "
        "`down(act_and_mul(gate_up(x)))`. Found by the expression's shape (an activation of one "
        "column projection times another of the same input), not by names."
    )
    examples = [
        Example(
            "from torch import nn\n\n\nclass MLP(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, "
            "bias=False)\n"
            "        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, "
            "bias=False)\n"
            "        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, "
            "bias=False)\n        self.act_fn = ACT2FN[config.hidden_act]\n\n"
            "    def forward(self, x):\n"
            "        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\n",
            "from torch import nn\n\n\nclass MLP(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, "
            "[config.intermediate_size] * 2, bias=False, quant_config=quant_config, "
            'prefix=f"{prefix}.gate_up_proj")\n'
            "        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, "
            "bias=False)\n        self.act_fn = get_act_and_mul_fn(config.hidden_act)\n\n"
            "    def forward(self, x):\n"
            "        return self.down_proj(self.act_fn(self.gate_up_proj(x)[0]))\n",
        ),
        # must leave unchanged: a gate and an up projection that are added, not multiplied
        # after the activation, are not fused (the engine's act-and-mul would change the
        # math)
        Example(_UNCHANGED_PT024, _UNCHANGED_PT024),
    ]

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        gu = self.plan.gate_up(cls or "")
        if not gu or len(self.scope) != 1 or updated.name.value != "__init__":
            return updated
        info = self.ctx.idx.classes[gu.cls]
        in_f, out_f, bias = linear_args(info.submodules[gu.gate].call)
        body = []
        for st in updated.body.body:
            attr = _assign_attr(st)
            if attr == gu.gate:
                body.append(cst.parse_statement(
                    f"self.gate_up_proj = {self.ctx.use('MergedColumnParallelLinear')}({in_f}, [{out_f}] * 2, "
                    f"bias={bias}, quant_config=quant_config, prefix=f\"{{prefix}}.gate_up_proj\")\n"))
                continue
            if attr == gu.up:
                continue
            if attr == gu.act:
                value = st.body[0].value  # type: ignore[attr-defined]
                if m.matches(value, m.Subscript(value=m.Name("ACT2FN"))):
                    key = code(value.slice[0].slice.value)
                    body.append(cst.parse_statement(
                        f"self.{gu.act} = {self.ctx.use('get_act_and_mul_fn')}({key})\n"))
                    continue
                raise self.ctx.idx.error("gated MLP activation is not ACT2FN[...]",
                                         construct=f"{gu.cls}.__init__", rule=self.name)
            body.append(st)
        self.mark(f"{cls}.__init__")
        return updated.with_changes(body=updated.body.with_changes(body=body))

    def leave_BinaryOperation(self, original, updated):
        gu = self.plan.gate_up(self.current_class or "")
        if not gu or self.current_function != "forward" or not isinstance(updated.operator, cst.Multiply):
            return updated
        for act_side, up_side in ((updated.left, updated.right), (updated.right, updated.left)):
            if (self_call_attr(act_side) == gu.act and self_call_attr(up_side) == gu.up
                    and self_call_attr(act_side.args[0].value) == gu.gate):  # type: ignore[attr-defined]
                x = up_side.args[0].value  # type: ignore[attr-defined]
                inner = cst.Subscript(
                    value=cst.Call(func=cst.parse_expression("self.gate_up_proj"), args=[cst.Arg(x)]),
                    slice=[cst.SubscriptElement(cst.Index(cst.Integer("0")))],
                )
                return cst.Call(func=cst.parse_expression(f"self.{gu.act}"), args=[cst.Arg(inner)])
        return updated
