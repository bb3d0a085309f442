"""What sits between per-expert weights and the sum over a token's routes.

The engine's FusedMoE computes every route's expert MLP and sums the routes weighted by the
router inside one kernel: nothing can act on one route's output before that sum. Some models
do (Ergo: a learned RMSNorm per expert on each route's output, `self.post_expert_norm(out,
expert_ids)` after `super().forward(...)` of the class holding the weights). This module finds
such a step, so the refusal names it rather than whatever the port would trip on next.
"""

from __future__ import annotations

import libcst.matchers as m

from porter.analysis.cstutil import findall, param_names, self_call_attr
from porter.analysis.index import ClassInfo, ModelIndex

_SUPER_FORWARD = m.Call(func=m.Attribute(value=m.Call(func=m.Name("super")), attr=m.Name("forward")))


def _indexed_by_argument(info: ClassInfo) -> bool:
    """The module's forward picks rows of a tensor by one of its arguments (`weight[expert_ids]`)."""
    fwd = info.method("forward")
    params = set(param_names(fwd)) - {"self"} if fwd is not None else set()
    return any(m.matches(s.slice[0].slice, m.Index(m.Name())) and s.slice[0].slice.value.value in params  # type: ignore[attr-defined]
               for s in findall(fwd, m.Subscript(slice=[m.SubscriptElement()]))) if fwd is not None else False


def route_norm_note(idx: ModelIndex, experts: ClassInfo) -> str | None:
    """`, whose routes' outputs D.attr (S: ...) transforms per expert before the weighted sum` when a
    subclass D of `experts` calls `super().forward(...)` and then a sub-module S of the file on its
    result that indexes a weight by an argument (the route's expert id)."""
    for info in idx.classes.values():
        fwd = info.method("forward")
        if experts.name not in info.bases or fwd is None or not findall(fwd, _SUPER_FORWARD):
            continue
        for call in findall(fwd, m.Call(func=m.Attribute(value=m.Name("self")))):
            attr = self_call_attr(call)
            sub = info.submodules.get(attr or "")
            cls = idx.classes.get(sub.ctor) if sub and sub.ctor else None
            if cls is not None and len(call.args) >= 2 and _indexed_by_argument(cls):  # type: ignore[attr-defined]
                return (f", whose routes' outputs {info.name}.{attr} ({cls.name}: a weight per expert, picked by "
                        "the route's expert) transforms one by one before the weighted sum: the engine's FusedMoE "
                        "sums the routes inside its kernel")
    return None
