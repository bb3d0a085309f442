"""PT243 act-then-mul: the rule `ActThenMul`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.errors import PorterError
from porter.passes.base import Example, Rule
from porter.plan.model import GateUpPlan

_MLP = (
    "from torch import nn\n\n\nclass MLP(nn.Module):\n    def __init__(self, config):\n"
    "        super().__init__()\n"
    "        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, "
    "bias=False)\n"
    "        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False)\n"
    "        self.act_fn = {act}(config.hidden_act)\n\n"
    "    def forward(self, x):\n{body}"
)


class ActThenMul(Rule):
    descend_methods = frozenset()  # works on __init__ and forward as a whole
    code = "PT243"
    name = "act-then-mul"
    why = (
        "PT024 fuses a gated MLP's activation and multiply into the engine's act-and-mul kernel "
        "(`get_act_and_mul_fn(config.hidden_act)`), which exists for a few activations only "
        "(rules/hf_strip.yaml: engine_act_and_mul). When the config class defaults the activation "
        "to another one (BitNet's `relu2`), the engine would refuse to build the port; the "
        "activation then stays the engine's plain one (`get_act_fn`) and the merged projection's "
        "output is split into this rank's gate and up halves: `gate, up = "
        "self.gate_up_proj(x)[0].chunk(2, dim=-1)`, `self.act_fn(gate) * up`, as HF computes it."
    )
    examples = [Example(
        _MLP.format(act="get_act_and_mul_fn",
                    body="        return self.down_proj(self.act_fn(self.gate_up_proj(x)[0]))[0]\n"),
        _MLP.format(act="get_act_fn",
                    body="        gate, up = self.gate_up_proj(x)[0].chunk(2, dim=-1)\n"
                         "        return self.down_proj(self.act_fn(gate) * up)[0]\n"),
        seed={"gate_ups": [GateUpPlan("MLP", "gate_proj", "up_proj", "act_fn", 4, unfused=True)]},
    )]

    @classmethod
    def applies(cls, ctx) -> bool:
        return any(g.unfused for g in ctx.plan.gate_ups)

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        gu = self.plan.gate_up(cls or "")
        if gu is None or not gu.unfused or len(self.scope) != 1:
            return updated
        act = m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(gu.act)), args=[m.Arg()])
        body: list[cst.BaseStatement] = []
        for st in updated.body.body:
            if updated.name.value == "__init__" and m.matches(st, m.SimpleStatementLine(body=[m.Assign(
                    targets=[m.AssignTarget(m.Attribute(value=m.Name("self"), attr=m.Name(gu.act)))],
                    value=m.Call(func=m.Name("get_act_and_mul_fn")))])):
                value = st.body[0].value  # type: ignore[attr-defined]
                st = st.with_changes(body=[st.body[0].with_changes(  # type: ignore[attr-defined]
                    value=value.with_changes(func=cst.Name(self.ctx.use("get_act_fn"))))])
                self.mark(f"{cls}.__init__")
            elif updated.name.value == "forward" and (calls := m.findall(st, act)):
                if not (m.findall(st, m.Arg(value=act)) or m.findall(st, m.Return(value=act))
                        or m.findall(st, m.Assign(value=act))):  # (where `a * b` needs no parentheses)
                    raise PorterError("a gated activation the engine does not fuse, used inside an expression: "
                                      "cannot split it into gate and up", file=self.ctx.idx.path,
                                      line=gu.line, construct=f"{cls}.forward", rule=self.name)
                x = calls[0].args[0].value  # type: ignore[attr-defined]
                body.append(cst.parse_statement("gate, up = X.chunk(2, dim=-1)\n").with_changes(body=[
                    cst.parse_statement("gate, up = X.chunk(2, dim=-1)\n").body[0].with_changes(  # type: ignore[attr-defined]
                        value=cst.parse_expression("X.chunk(2, dim=-1)").with_changes(
                            func=cst.Attribute(value=x, attr=cst.Name("chunk"))))]))
                st = m.replace(st, act, cst.parse_expression(f"self.{gu.act}(gate) * up"))  # type: ignore[assignment]
                self.mark(f"{cls}.forward")
            body.append(st)
        return updated.with_changes(body=updated.body.with_changes(body=body))
