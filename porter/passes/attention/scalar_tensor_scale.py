"""PT158 scalar-tensor-scale: the rule `ScalarTensorScale`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.passes.attention._common import BeforeIndexRule
from porter.passes.attention._score_arms import computes_softmax
from porter.passes.base import Example

_PLACEMENT = {"dtype", "device"}


def _scalar(e: cst.BaseExpression) -> cst.BaseExpression | None:
    """`torch.full([], X, dtype=..., device=...)` or `torch.tensor(X, dtype=..., device=...)` (X no
    list): a 0-d tensor holding X, cast and placed only -> X; None for anything else."""
    if not m.matches(e, m.Call(func=m.Attribute(value=m.Name("torch"), attr=m.Name("full") | m.Name("tensor")))):
        return None
    pos = [a.value for a in e.args if a.keyword is None and not a.star]  # type: ignore[attr-defined]
    if any(a.star or (a.keyword is not None and a.keyword.value not in _PLACEMENT) for a in e.args):  # type: ignore[attr-defined]
        return None
    if e.func.attr.value == "full":  # type: ignore[attr-defined]
        if len(pos) != 2 or not m.matches(pos[0], m.List(elements=[]) | m.Tuple(elements=[])):
            return None
        value = pos[1]
    else:
        if len(pos) != 1:
            return None
        value = pos[0]
    if isinstance(value, (cst.List, cst.Tuple, cst.ListComp)):
        return None
    return value.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()]) \
        if isinstance(value, (cst.BinaryOperation, cst.UnaryOperation, cst.IfExp)) and not value.lpar else value


class ScalarTensorScale(BeforeIndexRule):
    code = "PT158"
    name = "scalar-tensor-scale"
    why = (
        "GPT-2 in transformers 4.x scales its scores by a 0-d tensor it builds on the spot, cast "
        "and placed like the scores: `w = w / torch.full([], v.size(-1) ** 0.5, dtype=w.dtype, "
        "device=w.device)`. The scale PT150 hands the engine's Attention is a number fixed when the "
        "layer is built, where no score tensor exists: in a method that takes the softmax itself, a "
        "product or quotient by such a tensor (`torch.full([], X, ...)`, `torch.tensor(X, ...)`, "
        "with nothing but `dtype=` and `device=`) becomes one by X. The engine applies the scale "
        "in its own precision, as it does for every scale."
    )
    visits_dropped_code = True
    word = "softmax"  # before indexing: only the top-level statements naming it are walked
    examples = [
        Example(
            "class Attn(nn.Module):\n    def _attn(self, q, k, v):\n"
            "        w = torch.matmul(q, k.transpose(-1, -2))\n"
            "        w = w / torch.full([], v.size(-1) ** 0.5, dtype=w.dtype, device=w.device)\n"
            "        w = nn.functional.softmax(w, dim=-1)\n"
            "        return torch.matmul(w, v), w\n",
            "class Attn(nn.Module):\n    def _attn(self, q, k, v):\n"
            "        w = torch.matmul(q, k.transpose(-1, -2))\n"
            "        w = w / (v.size(-1) ** 0.5)\n"
            "        w = nn.functional.softmax(w, dim=-1)\n"
            "        return torch.matmul(w, v), w\n",
        ),
        # unchanged: a tensor of a shape of its own (not 0-d) scales element by element
        Example(
            "class Attn(nn.Module):\n    def _attn(self, q, k, v):\n"
            "        w = torch.matmul(q, k.transpose(-1, -2))\n"
            "        w = w / torch.full([w.size(-1)], 8.0, dtype=w.dtype)\n"
            "        w = nn.functional.softmax(w, dim=-1)\n"
            "        return torch.matmul(w, v), w\n",
            "class Attn(nn.Module):\n    def _attn(self, q, k, v):\n"
            "        w = torch.matmul(q, k.transpose(-1, -2))\n"
            "        w = w / torch.full([w.size(-1)], 8.0, dtype=w.dtype)\n"
            "        w = nn.functional.softmax(w, dim=-1)\n"
            "        return torch.matmul(w, v), w\n",
        ),
    ]

    def visit_FunctionDef(self, node):
        if len(self.scope) == 1:
            self._soft = computes_softmax(node)
        return super().visit_FunctionDef(node)

    def leave_BinaryOperation(self, original, updated):
        if len(self.scope) < 2 or not getattr(self, "_soft", False) \
                or not isinstance(updated.operator, (cst.Divide, cst.Multiply)):
            return updated
        right = _scalar(updated.right)
        if right is not None:
            return updated.with_changes(right=right)
        left = _scalar(updated.left) if isinstance(updated.operator, cst.Multiply) else None
        return updated if left is None else updated.with_changes(left=left)

    def leave_AugAssign(self, original, updated):
        if len(self.scope) < 2 or not getattr(self, "_soft", False) \
                or not isinstance(updated.operator, (cst.DivideAssign, cst.MultiplyAssign)):
            return updated
        value = _scalar(updated.value)
        return updated if value is None else updated.with_changes(value=value)
