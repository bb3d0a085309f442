"""A per-position factor shaped for HF's (batch, heads, seq, head_dim) layout: one per flat token."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import findall
from porter.passes.base import Example, Rule

_WHOLE = m.SubscriptElement(m.Slice(lower=None, upper=None, step=None))


_NEW = m.SubscriptElement(m.Index(m.Name("None")))


# x[:, None, :, None]: positions (batch, seq) against q/k/v (batch, heads, seq, head_dim)
_HF_BROADCAST = m.Subscript(slice=[_WHOLE, _NEW, _WHOLE, _NEW])


_POSITIONS = {"position_ids", "positions"}


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


def factor_helpers(ctx) -> set[str]:
    """Module functions whose every return is `x[:, None, :, None]`, called by the kept forwards,
    each time with the positions as first argument."""
    if "position_factor" in ctx.memo:
        return ctx.memo["position_factor"]
    shaped = {name for name, fn in ctx.idx.functions.items()
              if (rets := findall(fn, m.Return()))
              and all(r.value is not None and m.matches(r.value, _HF_BROADCAST) for r in rets)}  # type: ignore[attr-defined]
    called: dict[str, bool] = {}
    for cls in ctx.plan.classes if shaped else []:
        fwd = ctx.idx.classes[cls].method("forward") if cls in ctx.idx.classes else None
        for call in findall(fwd, m.Call(func=m.Name())) if fwd else []:
            name = call.func.value  # type: ignore[attr-defined]
            if name in shaped:
                first = call.args[0] if call.args else None  # type: ignore[attr-defined]
                ok = first is not None and first.keyword is None and m.matches(
                    first.value, m.Name(m.MatchIfTrue(lambda n: n in _POSITIONS)))
                called[name] = called.get(name, True) and ok
    ctx.memo["position_factor"] = out = {n for n, ok in called.items() if ok}
    return out


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
        return bool(factor_helpers(ctx))

    def leave_Module(self, original, updated):
        helpers = factor_helpers(self.ctx)
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
        if value is None or not m.matches(value, _HF_BROADCAST):
            return updated
        first, new = value.slice[:2]  # type: ignore[attr-defined]
        new = new.with_changes(comma=cst.MaybeSentinel.DEFAULT)
        return updated.with_changes(value=value.with_changes(slice=[first, new]))
