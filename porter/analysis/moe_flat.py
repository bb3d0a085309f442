"""Mixture-of-experts blocks whose experts hold their weights flat (dbrx), recognised by dataflow.

The block's forward: `logits = self.R(x)` (R: a module returning one bias-free projection of its
input, one logit per expert), `weights, indices = self.M(logits)` (M: a method of the block taking
top-k of the logits: the routing, kept as its own code, FusedMoE's `custom_routing_function`), and
`self.E(x, indices, weights)` (E: experts summing per-expert outputs with `index_add_`, the weights
of a module inside E held flat, `(experts * ffn, hidden)`, read per expert as `W.view(-1, I, H)[e]`
and handed to that module's forward, which applies `act(x @ g.T) * (x @ u.T)` then `@ d`: g, u
stored as FusedMoE's w1 / w3, d transposed from its w2).
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import findall, param_names, self_attr, self_call_attr
from porter.analysis.index import LINEAR_NAMES, ClassInfo, ModelIndex
from porter.analysis.layouts import linear_args
from porter.analysis.moe import MoePlan, _init_attrs, _param_shape, _resolve


def _logits_router(info: ClassInfo) -> cst.Call | None:
    """The constructor call of R's one bias-free linear, when R's forward returns its projection."""
    fwd = info.method("forward")
    linears = {a: s for a, s in info.submodules.items() if s.ctor in LINEAR_NAMES}
    if fwd is None or len(linears) != 1 or findall(fwd, m.Call(func=m.Attribute(attr=m.Name("topk")))):
        return None
    (attr, sub), = linears.items()
    if linear_args(sub.call)[2] != "False":
        return None
    projected = {t.target.value for a in findall(fwd, m.Assign(targets=[m.AssignTarget(m.Name())]))  # type: ignore[attr-defined]
                 if self_call_attr(a.value) == attr for t in a.targets}  # type: ignore[attr-defined]
    returns = findall(fwd, m.Return(value=m.Name()))
    if len(returns) != 1 or returns[0].value.value not in projected:  # type: ignore[attr-defined]
        return None
    return sub.call


def _glu(idx: ModelIndex, experts: ClassInfo) -> tuple[str, ClassInfo, list[str], cst.BaseExpression] | None:
    """(inner attribute, its class, [gate, up, down] weights, the per-expert intermediate size)."""
    fwd = experts.method("forward")
    if fwd is None or not findall(fwd, m.Call(func=m.Attribute(attr=m.Name("index_add_")))):
        return None
    views: dict[str, tuple[str, str, cst.BaseExpression]] = {}  # local -> (inner, weight, shape)
    for a in findall(fwd, m.Assign(targets=[m.AssignTarget(m.Name())], value=m.Subscript(value=m.Call(
            func=m.Attribute(value=m.Attribute(value=m.Attribute(value=m.Name("self"))), attr=m.Name("view")))))):
        view = a.value.value  # type: ignore[attr-defined]
        holder = view.func.value
        views[a.targets[0].target.value] = (self_attr(holder.value), holder.attr.value, view.args[0].value)  # type: ignore[attr-defined]
    inner = {v[0] for v in views.values()}
    if len(views) != 3 or len(inner) != 1:
        return None
    (attr,) = inner
    sub = experts.submodules.get(attr)
    cls = idx.classes.get(sub.ctor) if sub else None
    calls = [c for c in findall(fwd, m.Call()) if self_call_attr(c) == attr]
    glu_fwd = cls.method("forward") if cls else None
    if cls is None or glu_fwd is None or len(calls) != 1:
        return None
    weights = {a: s for a, v in _init_attrs(cls).items() if (s := _param_shape(v)) is not None}
    if sorted(w for _, w, _ in views.values()) != sorted(weights) or any(len(s) != 2 for s in weights.values()):
        return None
    params = [p for p in param_names(glu_fwd) if p != "self"]
    handed = {p: views[a.value.value][1] for p, a in zip(params, calls[0].args)  # type: ignore[attr-defined]
              if isinstance(a.value, cst.Name) and a.value.value in views}
    roles = _glu_roles(glu_fwd, handed)
    if roles is None:
        return None
    shape = next(iter(views.values()))[2]
    shape = _local(fwd, shape)
    if not isinstance(shape, cst.Tuple) or len(shape.elements) != 3:
        return None
    return attr, cls, roles, shape.elements[1].value


def _local(fn: cst.FunctionDef, node: cst.BaseExpression) -> cst.BaseExpression:
    """A name bound once in FN to a value: that value."""
    if not isinstance(node, cst.Name):
        return node
    bound = [a.value for a in findall(fn, m.Assign(targets=[m.AssignTarget(m.Name(node.value))]))]  # type: ignore[attr-defined]
    return bound[0] if len(bound) == 1 else node


def _glu_roles(fwd: cst.FunctionDef, handed: dict[str, str]) -> list[str] | None:
    """[gate, up, down] weights: `g = x.matmul(W.T)` activated, `u = x.matmul(W.T)`, `(g * u).matmul(W)`."""
    products: dict[str, str] = {}  # local -> weight, of `x.matmul(W.T)`
    down = None
    for a in findall(fwd, m.Assign(targets=[m.AssignTarget(m.Name())], value=m.Call(
            func=m.Attribute(attr=m.Name("matmul")), args=[m.Arg()]))):
        arg = a.value.args[0].value  # type: ignore[attr-defined]
        if m.matches(arg, m.Attribute(value=m.Name(), attr=m.Name("T"))) and arg.value.value in handed:
            products[a.targets[0].target.value] = handed[arg.value.value]  # type: ignore[attr-defined]
    for c in findall(fwd, m.Call(func=m.Attribute(attr=m.Name("matmul")), args=[m.Arg(m.Name())])):
        if c.args[0].value.value in handed:  # type: ignore[attr-defined]
            down = handed[c.args[0].value.value]  # type: ignore[attr-defined]
    activated = {a.targets[0].target.value for a in findall(fwd, m.Assign(  # type: ignore[attr-defined]
        targets=[m.AssignTarget(m.Name())], value=m.Call(func=m.Attribute(value=m.Name("self")),
                                                         args=[m.Arg(m.Name(m.MatchIfTrue(lambda n: n in products)))])))}
    gates = [products[n] for n in activated]
    ups = [w for n, w in products.items() if n not in activated]
    if down is None or len(gates) != 1 or len(ups) != 1:
        return None
    return [gates[0], ups[0], down]


def _activation(glu: ClassInfo) -> cst.BaseExpression | None:
    init = glu.method("__init__")
    for v in _init_attrs(glu).values():
        if m.matches(v, m.Subscript(value=m.Name("ACT2FN"))) and init is not None:
            return _local(init, v.slice[0].slice.value)  # type: ignore[attr-defined]
    return None


def flat_block(idx: ModelIndex, info: ClassInfo) -> MoePlan | None:
    fwd = info.method("forward")
    if fwd is None:
        return None
    stmts = [st.body[0] for st in fwd.body.body if m.matches(st, m.SimpleStatementLine(body=[m.Assign(
        targets=[m.AssignTarget()], value=m.Call())]))]
    calls = [(st, self_attr(st.value.func)) for st in stmts]  # type: ignore[attr-defined]
    if len(calls) < 2 or any(a is None for _, a in calls[:2]):
        return None
    (route_logits, r_attr), (route, method) = calls[:2]
    # the experts: the one other submodule the forward calls (assigned or returned)
    runs = [c for c in findall(fwd, m.Call()) if self_call_attr(c) not in (None, r_attr, method)]
    if len(runs) != 1:
        return None
    run, e_attr = runs[0], self_call_attr(runs[0])
    r_sub, e_sub = info.submodules.get(r_attr or ""), info.submodules.get(e_attr or "")
    r_cls = idx.classes.get(r_sub.ctor) if r_sub else None
    e_cls = idx.classes.get(e_sub.ctor) if e_sub else None
    fn = info.method(method or "")
    if r_cls is None or e_cls is None or fn is None or not isinstance(route_logits.targets[0].target, cst.Name):
        return None
    linear = _logits_router(r_cls)
    glu = _glu(idx, e_cls)
    topk = findall(fn, m.Call(func=m.Attribute(value=m.Name("torch"), attr=m.Name("topk"))))
    logits = route_logits.targets[0].target.value
    out = route.targets[0].target
    if linear is None or glu is None or len(topk) != 1 or not isinstance(out, cst.Tuple) or len(out.elements) != 2:
        return None
    # dataflow: the method routes the router's logits; the experts read its (weights, indices)
    weights, indices = (e.value.value if isinstance(e.value, cst.Name) else None for e in out.elements)
    if not m.matches(route.value, m.Call(args=[m.Arg(m.Name(logits))])) or not m.matches(  # type: ignore[attr-defined]
            run, m.Call(args=[m.Arg(m.Name()), m.Arg(m.Name(indices or "")), m.Arg(m.Name(weights or ""))])):
        return None
    k = next((a.value for a in topk[0].args if a.keyword and a.keyword.value == "k"), None) or topk[0].args[1].value  # type: ignore[attr-defined]
    inner, glu_cls, (gate, up, down), inter = glu
    act = _activation(glu_cls)
    in_f, out_f, _ = linear_args(linear)
    if act is None:
        return None
    inner_call = e_cls.submodules[inner].call

    # expressions over the block's own __init__ parameters: through the router's or experts'
    # constructor call (and the experts' inner module's) to the block's arguments
    e_args = e_sub.call  # type: ignore[union-attr]
    return MoePlan(
        cls=info.name, router=r_attr, router_cls=r_cls.name, experts=e_attr, experts_cls=e_cls.name,  # type: ignore[arg-type]
        num_experts=_resolve(cst.parse_expression(out_f), r_cls, r_sub.call),  # type: ignore[union-attr]
        hidden_size=_resolve(cst.parse_expression(in_f), r_cls, r_sub.call),  # type: ignore[union-attr]
        top_k=_resolve(k, info, None),
        intermediate_size=_resolve(inter, e_cls, e_args),
        renormalize="False",
        activation=_resolve(cst.parse_expression(_resolve(act, glu_cls, inner_call)), e_cls, e_args),
        gate_up=gate, down=down, line=info.line, router_logits=logits,
        flat=[inner, glu_cls.name, gate, up, down], route_method=method or "",
    )


def find_flat_blocks(idx: ModelIndex, classes: list[str], found: list[MoePlan]) -> list[MoePlan]:
    """The blocks of CLASSES that route to flat experts, beside those already FOUND."""
    done = {p.cls for p in found}
    return [p for name in classes if name not in done and (p := flat_block(idx, idx.classes[name])) is not None]
