"""Mixture-of-experts blocks that route inline and loop over a list of expert MLPs (transformers
4.x Mixtral), recognised by dataflow.

The block's forward computes, in order (porter/analysis/moe_router.py reads the routing part):

- the logits: a bias-free nn.Linear of the block, one logit per expert, of its input (maybe
  viewed flat, `x.view(-1, hidden)`), then the engine's routing of them (softmax, top-k, the
  top-k weights maybe divided by their sum, casts);
- an accumulator of zeros, and a loop `for e in range(E)` over the experts: the rows each
  expert is picked for (`torch.where(one_hot(indices, E).permute(2, 1, 0)[e])` giving (slot,
  token), or `torch.where(indices == e)` giving (token, slot)), that expert (`self.experts[e]`,
  an nn.ModuleList of E SwiGLU MLPs: `down(act(gate(x)) * up(x))`, bias-free linears) applied to
  those rows of the input, scaled by `weights[token, slot, None]` and added back with
  `acc.index_add_(0, token, ...)`;
- the accumulator returned (reshaped back to the input's shape), maybe with the logits.

That is the engine's FusedMoE over the gate's logits: the gate a `GateLinear`, the expert list
one FusedMoE whose per-expert checkpoint names are the MLP's own (`experts.N.<gate|down|up>`).
Training-only steps (router jitter under `if self.training and ...`) are not part of inference.
Anything else in the forward (a shared expert, a second output read by the caller beside the
logits) and the block is not read.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import assigned_names, findall, param_names, self_attr, self_call_attr
from porter.analysis.index import LINEAR_NAMES, ClassInfo, ModelIndex
from porter.analysis.layouts import linear_args
from porter.analysis.moe import MoePlan, _init_attrs, _resolve
from porter.analysis.moe_router import V, RouterReader, _as_weights

_TRAINING = m.Attribute(value=m.Name("self"), attr=m.Name("training"))
_CAST = ("to", "float", "type", "type_as", "contiguous")
_RESHAPE = ("view", "reshape")


def _strip(node: cst.BaseExpression, names: tuple[str, ...]) -> cst.BaseExpression:
    """NODE without trailing `.to(...)` / `.view(...)`-like calls of NAMES."""
    while m.matches(node, m.Call(func=m.Attribute(attr=m.Name(m.MatchIfTrue(lambda n: n in names))))):
        node = node.func.value  # type: ignore[union-attr, attr-defined]
    return node


def swiglu_mlp(info: ClassInfo) -> tuple[str, str, str, cst.BaseExpression, cst.BaseExpression] | None:
    """(gate, up, down, intermediate size, activation key) of a module whose forward is
    `down(act(gate(x)) * up(x))` over three bias-free nn.Linear of its own."""
    fwd = info.method("forward")
    linears = {a: s.call for a, s in info.submodules.items() if s.ctor in LINEAR_NAMES}
    if fwd is None or len(linears) != 3 or len(info.submodules) != 3:
        return None
    params = [p for p in param_names(fwd) if p != "self"]
    if len(params) != 1:
        return None
    x = params[0]
    act = next((v.slice[0].slice.value for v in _init_attrs(info).values()  # type: ignore[attr-defined]
                if m.matches(v, m.Subscript(value=m.Name("ACT2FN")))), None)
    if act is None:
        return None
    env: dict[str, tuple] = {x: ("x",)}

    def value(node: cst.BaseExpression) -> tuple | None:
        node = _strip(node, _CAST)
        if isinstance(node, cst.Name):
            return env.get(node.value)
        attr = self_call_attr(node)
        if attr in linears and len(node.args) == 1:  # type: ignore[attr-defined]
            inner = value(node.args[0].value)  # type: ignore[attr-defined]
            if inner == ("x",):
                return ("proj", attr)
            if inner is not None and inner[0] == "glu":
                return ("out", attr, inner)
            return None
        if attr is not None and attr not in linears and len(node.args) == 1:  # `self.act_fn(...)` # type: ignore[attr-defined]
            held = _init_attrs(info).get(attr)
            inner = value(node.args[0].value)  # type: ignore[attr-defined]
            if m.matches(held, m.Subscript(value=m.Name("ACT2FN"))) and inner is not None and inner[0] == "proj":
                return ("act", inner[1])
            return None
        if m.matches(node, m.BinaryOperation(operator=m.Multiply())):
            a, b = value(node.left), value(node.right)  # type: ignore[attr-defined]
            if a is not None and b is not None and {a[0], b[0]} == {"act", "proj"}:
                g, u = (a, b) if a[0] == "act" else (b, a)
                return ("glu", g[1], u[1])
        return None

    out = None
    for st in fwd.body.body:  # type: ignore[attr-defined]
        if not isinstance(st, cst.SimpleStatementLine) or len(st.body) != 1:
            return None
        s = st.body[0]
        if isinstance(s, cst.Assign) and len(s.targets) == 1 and isinstance(s.targets[0].target, cst.Name):
            v = value(s.value)
            if v is None:
                return None
            env[s.targets[0].target.value] = v
        elif isinstance(s, cst.Return) and s.value is not None and out is None:
            out = value(s.value)
        elif not (isinstance(s, cst.Expr) and isinstance(s.value, cst.SimpleString)):
            return None
    if out is None or out[0] != "out":
        return None
    _, down, (_, gate, up) = out
    if len({gate, up, down}) != 3 or any(linear_args(linears[a])[2] != "False" for a in (gate, up, down)):
        return None
    g_in, g_out, _ = linear_args(linears[gate])
    u_in, u_out, _ = linear_args(linears[up])
    d_in, d_out, _ = linear_args(linears[down])
    if (g_in, g_out) != (u_in, u_out) or (d_in, d_out) != (g_out, g_in):
        return None
    return gate, up, down, cst.parse_expression(g_out), act


class _Loop:
    """The expert loop's dataflow: which rows each expert reads, how its output is weighted, where
    it is added. Values: ("e",) the loop index, ("expert",), ("slot",), ("tok",), ("rows",),
    ("out",), ("wout",)."""

    def __init__(self, x: str, weights: str, indices: str, mask: str | None, experts: str, acc: str) -> None:
        self.x, self.weights, self.indices, self.mask, self.experts, self.acc = x, weights, indices, mask, experts, acc
        self.env: dict[str, tuple] = {}
        self.added = 0

    def value(self, node: cst.BaseExpression) -> tuple | None:  # noqa: C901 - one case per step
        node = _strip(node, _CAST)
        if isinstance(node, cst.Name):
            return self.env.get(node.value)
        if m.matches(node, m.Call(func=m.Attribute(attr=m.Name(m.MatchIfTrue(lambda n: n in _RESHAPE))))):
            inner = self.value(node.func.value)  # type: ignore[attr-defined]
            return inner if inner == ("rows",) else None
        if isinstance(node, cst.Subscript):
            idx = [s.slice.value if isinstance(s.slice, cst.Index) else None for s in node.slice]
            if self_attr(node.value) == self.experts and len(idx) == 1 and self.value(idx[0]) == ("e",):  # type: ignore[arg-type]
                return ("expert",)
            if m.matches(node.value, m.Name(self.x)):  # x[tok] or x[None, tok]
                idx = [i for i in idx if not m.matches(i, m.Name("None"))]
                return ("rows",) if len(idx) == 1 and self.value(idx[0]) == ("tok",) else None  # type: ignore[arg-type]
            if m.matches(node.value, m.Name(self.weights)) and len(idx) == 3 and m.matches(idx[2], m.Name("None")) \
                    and self.value(idx[0]) == ("tok",) and self.value(idx[1]) == ("slot",):  # type: ignore[arg-type]
                return ("w",)
            return None
        if isinstance(node, cst.Call) and len(node.args) == 1 and node.args[0].keyword is None:
            callee = self.value(node.func)
            if callee == ("expert",) and self.value(node.args[0].value) == ("rows",):
                return ("out",)
            return None
        if m.matches(node, m.BinaryOperation(operator=m.Multiply())):
            a, b = self.value(node.left), self.value(node.right)  # type: ignore[attr-defined]
            return ("wout",) if {a, b} == {("out",), ("w",)} else None
        return None

    def where(self, node: cst.BaseExpression, e: str) -> tuple[str, str] | None:
        """(first, second) kinds of what `torch.where(...)` gives: the slot and token of each hit."""
        if not m.matches(node, m.Call(func=m.Attribute(value=m.Name("torch"), attr=m.Name("where")),
                                      args=[m.Arg(keyword=None)])):
            return None
        arg = node.args[0].value  # type: ignore[attr-defined]
        if self.mask and m.matches(arg, m.Subscript(value=m.Name(self.mask), slice=[m.SubscriptElement(m.Index(m.Name(e)))])):
            return ("slot", "tok")  # the (experts, slots, tokens) one-hot mask of expert e
        if m.matches(arg, m.Comparison(left=m.Name(self.indices), comparisons=[
                m.ComparisonTarget(operator=m.Equal(), comparator=m.Name(e))])):
            return ("tok", "slot")  # (tokens, slots) positions where the indices name expert e
        return None

    def run(self, loop: cst.For) -> bool:
        if not isinstance(loop.target, cst.Name) or loop.orelse is not None:
            return False
        e = loop.target.value
        self.env[e] = ("e",)
        for st in loop.body.body:  # type: ignore[attr-defined]
            if not isinstance(st, cst.SimpleStatementLine) or len(st.body) != 1:
                return False
            s = st.body[0]
            if isinstance(s, cst.Assign) and len(s.targets) == 1:
                t = s.targets[0].target
                if isinstance(t, cst.Tuple) and len(t.elements) == 2 and all(isinstance(el.value, cst.Name) for el in t.elements):
                    kinds = self.where(s.value, e)
                    if kinds is None:
                        return False
                    for el, k in zip(t.elements, kinds):
                        self.env[el.value.value] = (k,)  # type: ignore[attr-defined]
                elif isinstance(t, cst.Name) and t.value not in (self.x, self.weights, self.acc, e) \
                        and (v := self.value(s.value)) is not None:
                    self.env[t.value] = v
                else:
                    return False
            elif isinstance(s, cst.Expr) and m.matches(s.value, m.Call(func=m.Attribute(
                    value=m.Name(self.acc), attr=m.Name("index_add_")))):
                args = s.value.args  # type: ignore[attr-defined]
                if len(args) != 3 or not m.matches(args[0].value, m.Integer("0")) \
                        or self.value(args[1].value) != ("tok",) or self.value(args[2].value) != ("wout",):
                    return False
                self.added += 1
            else:
                return False
        return self.added == 1


def _read_before(reader: RouterReader, stmts: list, x: str) -> tuple[str | None, str | None, str | None] | None:
    """The statements before the expert loop: the routing (read by READER), the accumulator of
    zeros, the one-hot mask of the top-k indices; None at any other statement."""
    acc = mask = mask_of = None
    for st in stmts:
        if isinstance(st, cst.If):  # training only (router jitter): not part of inference
            if st.orelse is None and m.matches(st.test, _TRAINING | m.BooleanOperation(left=_TRAINING, operator=m.And())):
                continue
            return None
        if not isinstance(st, cst.SimpleStatementLine) or len(st.body) != 1:
            return None
        s = st.body[0]
        if isinstance(s, cst.Expr) and isinstance(s.value, (cst.SimpleString, cst.ConcatenatedString)):
            continue
        if isinstance(s, cst.Assign) and len(s.targets) == 1 and isinstance(s.targets[0].target, cst.Name):
            name = s.targets[0].target.value
            v = s.value
            if acc is None and m.matches(v, m.Call(func=m.Attribute(value=m.Name("torch"), attr=m.Name("zeros")))
                                         | m.Call(func=m.Attribute(value=m.Name("torch"), attr=m.Name("zeros_like")),
                                                  args=[m.Arg(m.Name(x)), m.ZeroOrMore()])):
                acc = name
                reader.env[name] = None
                continue
            # (experts, slots, tokens) one-hot mask of the top-k indices
            if mask is None and m.matches(v, m.Call(func=m.Attribute(attr=m.Name("permute"), value=m.Call(
                    func=m.Attribute(attr=m.Name("one_hot")), args=[m.Arg(m.Name()), m.ZeroOrMore()])),
                    args=[m.Arg(m.Integer("2")), m.Arg(m.Integer("1")), m.Arg(m.Integer("0"))])):
                hot = v.func.value  # type: ignore[attr-defined]
                iv = reader.env.get(hot.args[0].value.value)
                if iv is None or iv.kind != "idx":
                    return None
                mask, mask_of = name, hot.args[0].value.value
                reader.env[name] = None
                continue
        # a step of the routing (or the input's shape, a reshape of it): every name it binds is read
        if not isinstance(s, (cst.Assign, cst.AugAssign)):
            return None
        targets = [t.target for t in s.targets] if isinstance(s, cst.Assign) else [s.target]
        reader.statement(st)
        if not all(reader.env.get(n) is not None for t in targets for n in assigned_names(t)):  # type: ignore[arg-type]
            return None
    return acc, mask, mask_of


def inline_block(idx: ModelIndex, info: ClassInfo) -> MoePlan | None:  # noqa: C901 - one step per statement
    fwd = info.method("forward")
    if fwd is None:
        return None
    body = list(fwd.body.body)  # type: ignore[attr-defined]
    loops = [i for i, st in enumerate(body) if isinstance(st, cst.For)]
    lists = {a: s for a, s in info.submodules.items() if s.in_list and s.ctor in idx.classes}
    linears = {a: s.call for a, s in info.submodules.items() if s.ctor in LINEAR_NAMES}
    if len(loops) != 1 or len(lists) != 1 or len(linears) != 1 or len(info.submodules) != 2:
        return None
    (e_attr, e_sub), = lists.items()
    e_cls = idx.classes[e_sub.ctor]
    mlp = swiglu_mlp(e_cls)
    if mlp is None:
        return None
    attrs = _init_attrs(info)
    reader = RouterReader(info, attrs, linears)
    reader.params = param_names(fwd)
    args = [p for p in reader.params if p != "self"]
    if len(args) != 1:
        return None
    x = args[0]
    reader.env[x] = V("x")
    read = _read_before(reader, body[:loops[0]], x)
    if read is None:
        return None
    acc, mask, mask_of = read
    # the weights and indices the loop reads, from the routing read before it
    loop = body[loops[0]]
    weights = {n.value for n in findall(loop, m.Name())} & {n for n, v in reader.env.items() if
                                                           (w := _as_weights(v)) is not None and w.kind == "weights"}
    indices = [n for n, v in reader.env.items() if v is not None and v.kind == "idx"]
    if len(weights) != 1 or len(indices) != 1 or acc is None or (mask is not None and mask_of != indices[0]):
        return None
    (w_name,) = weights
    routing = reader.check(_as_weights(reader.env[w_name]), reader.env[indices[0]], (0, 1))  # type: ignore[arg-type]
    if routing is None or routing.scoring != "softmax" or routing.scale is not None or routing.bias is not None:
        return None
    # the loop runs once per expert, over the list's experts
    n = loop.iter  # type: ignore[attr-defined]
    if not m.matches(n, m.Call(func=m.Name("range"), args=[m.Arg()])):
        return None
    count = _list_count(info, e_attr)
    experts_n = _resolve(routing.shape[0], info, None)
    if count is None or _resolve(n.args[0].value, info, None) != experts_n or count != experts_n:  # type: ignore[attr-defined]
        return None
    if not _Loop(x, w_name, indices[0], mask, e_attr, acc).run(loop):  # type: ignore[arg-type]
        return None
    if not _returns_sum(body[loops[0] + 1:], acc, set(reader.logits_at)):
        return None
    gate, up, down, inter, act = mlp
    return MoePlan(
        cls=info.name, router=next(iter(linears)), router_cls="", experts=e_attr, experts_cls=e_cls.name,
        num_experts=experts_n,
        hidden_size=_resolve(routing.shape[1], info, None),
        top_k=_resolve(routing.top_k, info, None),
        intermediate_size=_resolve(inter, e_cls, e_sub.call),
        renormalize="False" if routing.renormalize is None else _resolve(routing.renormalize, info, None),
        activation=_resolve(act, e_cls, e_sub.call),
        gate_up=gate, down=down, line=info.line, ckpt_names=[gate, down, up], inline=True,
    )


def _returns_sum(tail: list, acc: str, logits: set[str]) -> bool:
    """After the loop: the accumulator reshaped, then returned (maybe with the logits)."""
    returned = False
    for st in tail:
        s = st.body[0] if isinstance(st, cst.SimpleStatementLine) and len(st.body) == 1 else None
        if isinstance(s, cst.Assign) and m.matches(s.targets[0].target, m.Name(acc)) and len(s.targets) == 1 \
                and m.matches(_strip(s.value, _RESHAPE + _CAST), m.Name(acc)) and not returned:
            continue
        if isinstance(s, cst.Return) and s.value is not None and not returned:
            value = s.value
            rest = []
            if isinstance(value, cst.Tuple):
                value, rest = value.elements[0].value, [el.value for el in value.elements[1:]]
            if not m.matches(_strip(value, _RESHAPE + _CAST), m.Name(acc)) or not all(
                    isinstance(r, cst.Name) and r.value in logits for r in rest):
                return False
            returned = True
            continue
        return False
    return returned


def _list_count(info: ClassInfo, attr: str) -> str | None:
    """How many modules `self.ATTR = nn.ModuleList([M(...) for _ in range(N)])` holds: N, resolved."""
    value = _init_attrs(info).get(attr)
    inner = value.args[0].value if isinstance(value, cst.Call) and value.args else None
    if not isinstance(inner, cst.ListComp) or inner.for_in.inner_for_in is not None or inner.for_in.ifs:
        return None
    it = inner.for_in.iter
    if not m.matches(it, m.Call(func=m.Name("range"), args=[m.Arg()])):
        return None
    return _resolve(it.args[0].value, info, None)  # type: ignore[attr-defined]


def find_inline_blocks(idx: ModelIndex, classes: list[str], found: list[MoePlan]) -> list[MoePlan]:
    """The blocks of CLASSES that route inline to a list of expert MLPs, beside those already FOUND."""
    done = {p.cls for p in found}
    return [p for name in classes if name not in done and (p := inline_block(idx, idx.classes[name])) is not None]
