"""A per-position factor shaped for HF's (batch, heads, seq, head_dim) layout: one per flat token."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.layouts import HF_POSITION_BROADCAST
from porter.passes.base import Example, Rule

_BEFORE = (
    "from torch import nn\n\n\n"
    "def position_scale(position_ids, beta, n):\n"
    "    scale = 1 + beta * torch.log(1 + torch.floor(position_ids / n))\n"
    "    return scale{index}\n\n\n"
    "class Attn(nn.Module):\n"
    "    def forward(self, q, positions):\n"
    "        q = q * position_scale(positions, 0.1, 16).to(q.dtype)\n"
    "        return q\n"
)


class FlatPositionFactor(Rule):
    descends = False  # rewrites module helpers, in leave_Module
    code = "PT180"
    name = "flat-position-factor"
    why = (
        "A factor per position computed by a module helper of `position_ids` and shaped for HF's "
        "layout: positions are (batch, seq) and q/k/v (batch, heads, seq, head_dim), so the helper "
        "returns `x[:, None, :, None]` (Ministral 3's llama-4 query scale `1 + beta * log(1 + "
        "floor(pos / n))`). The engine's positions are flat, (tokens,), and q/k/v (tokens, heads * "
        "head_dim): the same factor broadcasts over a token's features as `x[:, None]`. The helper "
        "is rewritten when every call of it in the kept forwards passes the positions first; left "
        "as it was, it raises IndexError on the engine's 1-D positions."
    )
    examples = [
        Example(_BEFORE.format(index="[:, None, :, None]"), _BEFORE.format(index="[:, None]")),
    ]

    @classmethod
    def applies(cls, ctx) -> bool:
        return bool(ctx.plan.position_factors)

    def leave_Module(self, original, updated):
        helpers = self.plan.position_factors
        body = []
        for st in updated.body:
            if isinstance(st, cst.FunctionDef) and st.name.value in helpers:
                st = st.visit(_Flat())  # type: ignore[assignment]
                self.mark(st.name.value)  # type: ignore[union-attr]
            body.append(st)
        return updated.with_changes(body=body)


class _Flat(cst.CSTTransformer):
    def leave_Return(self, original, updated):
        value = updated.value
        if value is None or not m.matches(value, HF_POSITION_BROADCAST):
            return updated
        first, new = value.slice[:2]  # type: ignore[attr-defined]
        new = new.with_changes(comma=cst.MaybeSentinel.DEFAULT)
        return updated.with_changes(value=value.with_changes(slice=[first, new]))
