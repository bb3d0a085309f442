"""A router that picks its routing by a config string: `if self.topk_method == "greedy": ...
elif self.topk_method == "group_limited_greedy": ...` (DeepSeek-V2).

Each branch is read as if it were the router's only code (porter/analysis/moe_router.py). Where
the branches compute the same routing but one of them restricts the top-k to the best groups, the
engine's grouped top-k reproduces both: its groups are the config's where that branch's test holds,
one group (the plain top-k) elsewhere. Branches that differ in anything else are not read."""

from __future__ import annotations

from dataclasses import fields

import libcst as cst

from porter.analysis.moe_router import Routing, keyed_tests, read_router

_GROUPING = ("n_group", "topk_group")


def read_routing(info, attrs: dict[str, cst.BaseExpression], linears: dict[str, cst.Call],
                 base_linear: list[cst.BaseExpression] | None = None) -> Routing | None:
    """read_router, and a router of one keyed chain read branch by branch."""
    routing = read_router(info, attrs, linears, base_linear)
    fwd = info.method("forward")
    if routing is not None or fwd is None:
        return routing
    chains = [st for st in fwd.body.body if isinstance(st, cst.If) and (keyed_tests(st) or [None])[1:]]
    if len(chains) != 1:
        return None
    tests = keyed_tests(chains[0])
    read = [read_router(info, attrs, linears, base_linear, branch=i) for i in range(len(tests))]  # type: ignore[arg-type]
    if any(r is None or r.function for r in read):
        return None
    grouped = [i for i, r in enumerate(read) if r.n_group is not None]  # type: ignore[union-attr]
    if len(grouped) > 1 or any(not _same(read[0], r) for r in read[1:]):  # type: ignore[arg-type]
        return None
    if not grouped:
        return read[0]
    r = read[grouped[0]]
    test = tests[grouped[0]]  # type: ignore[index]
    r.n_group, r.topk_group = (cst.IfExp(test=test, body=v, orelse=cst.Integer("1"))  # type: ignore[union-attr]
                               for v in (r.n_group, r.topk_group))  # type: ignore[union-attr]
    return r


def _same(a: Routing, b: Routing) -> bool:
    """The same routing but for its grouping."""
    for f in fields(Routing):
        if f.name in _GROUPING or f.name == "facts":
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, list):
            if len(x) != len(y) or not all(p.deep_equals(q) for p, q in zip(x, y)):
                return False
        elif isinstance(x, cst.CSTNode):
            if not isinstance(y, cst.CSTNode) or not x.deep_equals(y):
                return False
        elif x != y:
            return False
    return True
