"""Refusal of a projection that packs two tensors per head (rule engine-attention): the query and an
output gate interleaved head by head, `q_gate_proj(x).view(..., -1, 2 * head_dim).chunk(2, dim=-1)`
(transformers 5.25's MiniCPM5-MoE). The flattened port would cut the projection's output in two
halves instead of each head's block in two, and build its attention with twice the heads."""

from __future__ import annotations

from typing import TYPE_CHECKING

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, findall
from porter.analysis.layouts import local_bindings
from porter.plan.refusals import _ATTN_HEAD, Refusal

if TYPE_CHECKING:
    from porter.analysis.index import ClassInfo
    from porter.plan.model import PlanningContext as Planner

HEAD_PAIRS = Refusal(
    "cannot port attention: one projection holds {n} tensors interleaved head by head (`{view}` viewed per "
    "head, then `.chunk({n}, dim=-1)`); no rule splits each head's block for the engine's Attention",
    _ATTN_HEAD + "class Attn(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.head_dim = 16\n        self.q_gate_proj = nn.Linear(64, 2 * 4 * self.head_dim)\n\n"
    "    def forward(self, x):\n        shape = (*x.shape[:-1], -1, 2 * self.head_dim)\n"
    "        qg = self.q_gate_proj(x).view(shape)\n        q, g = qg.chunk(chunks=2, dim=-1)\n"
    "        out, _ = attention_interface(self, q, q, q, None)\n        return out * g.sigmoid()\n",
    "<example>:13: cannot port attention: one projection holds 2 tensors interleaved head by head "
    "(`self.q_gate_proj(x).view(shape)` viewed per head, then `.chunk(2, dim=-1)`); no rule splits each "
    "head's block for the engine's Attention in Attn.forward (rule engine-attention)",
    rule="engine-attention",
)


def _per_head_multiple(shape: cst.BaseExpression) -> int | None:
    """`(*s, -1, 2 * self.head_dim)`: the multiple of the head size the last axis holds."""
    if not isinstance(shape, cst.Tuple) or not shape.elements:
        return None
    last = shape.elements[-1].value
    if m.matches(last, m.BinaryOperation(operator=m.Multiply(), left=m.Integer())) and "head_dim" in code(last):
        return int(last.left.value)  # type: ignore[attr-defined]
    return None


def head_pairs(p: Planner, info: ClassInfo, fwd: cst.FunctionDef) -> None:
    """Refuse a `.view(shape)` whose last axis is k * head_dim, chunked in k along that axis."""
    local = local_bindings(fwd)
    for view in findall(fwd, m.Call(func=m.Attribute(attr=m.Name("view") | m.Name("reshape")))):
        args = view.args  # type: ignore[attr-defined]
        if len(args) != 1:
            continue
        shape = args[0].value
        if isinstance(shape, cst.Name):
            shape = local.get(shape.value, shape)
        k = _per_head_multiple(shape)
        if k is None or k < 2:
            continue
        bound = [n for n, v in local.items() if v is view or (isinstance(v, cst.Call) and v.deep_equals(view))]
        for chunk in findall(fwd, m.Call(func=m.Attribute(attr=m.Name("chunk")))):
            recv = chunk.func.value  # type: ignore[attr-defined]
            cargs = chunk.args  # type: ignore[attr-defined]
            if not cargs or not m.matches(cargs[0].value, m.Integer(value=str(k))):
                continue
            if recv.deep_equals(view) or (isinstance(recv, cst.Name) and recv.value in bound):
                raise HEAD_PAIRS.error(p, view, f"{info.name}.forward", n=k, view=code(view))
