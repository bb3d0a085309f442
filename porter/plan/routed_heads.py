"""Refusal of attention whose query comes out of a routed computation (rule fuse-qkv): a mixture of
attention heads (JetMoE's MoA), where a router picks each token's top-k experts, each expert
projects its own query heads, and the attention outputs go back through the experts and are summed
by the routing weights. Recognised by dataflow: the attention call's query is computed by a method
of a sub-module whose class (or a sub-module class of it) takes a top-k. The engine's Attention has
one fixed set of q/k/v projections, and its FusedMoE sums the routes inside its kernel, where these
experts keep each route's output as heads of their own."""

from __future__ import annotations

from typing import TYPE_CHECKING

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import assigned_names, code, dotted, findall, names_in
from porter.plan.refusals import _ATTN_HEAD, Refusal

if TYPE_CHECKING:
    from porter.analysis.index import ClassInfo, ModelIndex
    from porter.plan.model import PlanningContext as Planner

ROUTED_QUERY = Refusal(
    "cannot port attention: a mixture of attention heads (the query comes from `{call}`: module "
    "self.{attr} ({cls}) routes each token to its top-k experts, each projecting query heads of its "
    "own); the engine's Attention has one fixed set of q/k/v projections and its FusedMoE sums the "
    "routes inside its kernel, so no rule maps it",
    _ATTN_HEAD + "class Router(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
    "        self.w = nn.Linear(64, 4)\n\n    def map(self, x):\n"
    "        w, i = torch.topk(self.w(x), 2, dim=-1)\n        return x * w.sum(-1, keepdim=True), i\n\n\n"
    "class Attn(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.experts = Router()\n        self.kv_proj = nn.Linear(64, 128)\n\n"
    "    def forward(self, x):\n        q, idx = self.experts.map(x)\n        k, v = self.kv_proj(x).chunk(2, dim=-1)\n"
    "        out, _ = attention_interface(self, q, k, v, None)\n        return out\n",
    "<example>:24: cannot port attention: a mixture of attention heads (the query comes from "
    "`self.experts.map(x)`: module self.experts (Router) routes each token to its top-k experts, each "
    "projecting query heads of its own); the engine's Attention has one fixed set of q/k/v projections "
    "and its FusedMoE sums the routes inside its kernel, so no rule maps it in Attn.forward (rule fuse-qkv)",
    rule="fuse-qkv",
)


def _routes(idx: ModelIndex, cls: str, depth: int = 2) -> bool:
    """CLS, or the class of one of its sub-modules, takes a top-k (`torch.topk(...)` / `x.topk(...)`)."""
    info = idx.classes.get(cls)
    if info is None:
        return False
    if findall(info.node, m.Call(func=m.Attribute(attr=m.Name("topk")))):
        return True
    return depth > 0 and any(_routes(idx, s.ctor or "", depth - 1) for s in info.submodules.values())


def routed_query(p: Planner, info: ClassInfo, fwd: cst.FunctionDef, call: cst.Call) -> None:
    """Refuse when the query argument of the attention CALL derives from `self.A.method(...)` with A a
    routing sub-module."""
    pos = [a.value for a in call.args if a.keyword is None]
    if len(pos) < 2:
        return
    routed: dict[str, cst.Call] = {}  # local name -> the routed call it derives from
    for node in findall(fwd, m.Assign()):
        assert isinstance(node, cst.Assign)
        found = next((c for c in findall(node.value, m.Call(func=m.Attribute(value=m.Attribute(value=m.Name("self")))))
                      if (sub := info.submodules.get(c.func.value.attr.value)) is not None  # type: ignore[attr-defined]
                      and _routes(p.idx, sub.ctor or "")), None)
        if found is None:
            found = next((routed[n] for n in names_in(node.value) if n in routed), None)
        if found is not None:
            for t in node.targets:
                for n in assigned_names(t.target):
                    routed[n] = found  # type: ignore[assignment]
    query = next((routed[n] for n in names_in(pos[1]) if n in routed), None)
    if query is not None:
        attr = query.func.value.attr.value  # type: ignore[attr-defined]
        raise ROUTED_QUERY.error(p, call, f"{info.name}.forward", call=code(query), attr=attr,
                                 cls=info.submodules[attr].ctor or dotted(query.func))
