"""Facts about the layout of a model file that the planner and the rewrite passes both read:
what an `nn.Linear` call builds, how a packed q/k/v projection is split, which callables are
HF's attention op, where the query is pre-scaled. Pure functions of the index and the source.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, dotted, findall, names_in, param_names, self_attr, self_call_attr
from porter.analysis.index import ClassInfo, ModelIndex, is_transposed_linear

def linear_args(call: cst.Call) -> tuple[str, str, str]:
    """(in_features, out_features, bias) of an nn.Linear call, as source text."""
    pos = [a for a in call.args if a.keyword is None]
    kw = {a.keyword.value: a.value for a in call.args if a.keyword is not None}
    if is_transposed_linear(dotted(call.func)):  # Conv1D(nf, nx): out first, always with bias
        out_f = kw.get("nf", pos[0].value if pos else None)
        in_f = kw.get("nx", pos[1].value if len(pos) > 1 else None)
        if in_f is None or out_f is None:
            raise ValueError("transposed linear without in/out features")
        return code(in_f), code(out_f), "True"
    in_f = kw.get("in_features", pos[0].value if pos else None)
    out_f = kw.get("out_features", pos[1].value if len(pos) > 1 else None)
    bias = kw.get("bias", pos[2].value if len(pos) > 2 else None)
    if in_f is None or out_f is None:
        raise ValueError("nn.Linear without in/out features")
    return code(in_f), code(out_f), code(bias) if bias is not None else "True"


def heads_of(out_features: str, head_dim: str) -> str:
    node = cst.parse_expression(out_features)
    if isinstance(node, cst.BinaryOperation) and isinstance(node.operator, cst.Multiply):
        if code(node.right) == head_dim:
            return code(node.left)
        if code(node.left) == head_dim:
            return code(node.right)
    if isinstance(node, (cst.Name, cst.Attribute)):
        return f"{out_features} // {head_dim}"
    return f"({out_features}) // {head_dim}"


def strip_layout_calls(e: cst.BaseExpression) -> cst.BaseExpression:
    """`x[..., 0, :].transpose(1, 2)` -> `x[..., 0, :]`: a head-layout change after the pick (Bloom)."""
    while isinstance(e, cst.Call) and isinstance(e.func, cst.Attribute) \
            and e.func.attr.value in ("transpose", "permute", "contiguous"):
        e = e.func.value
    return e


def per_head_split_helper(info: ClassInfo, packed: str) -> str | None:
    """`qkv = self.packed(x); q, k, v = self._splitheads_of(qkv)` where the method views its input as
    `(..., heads, 3, head_dim)` and returns `x[..., 0, :], x[..., 1, :], x[..., 2, :]`: q/k/v
    interleaved per head (Persimmon, Bloom). Returns the method's name."""
    fwd = info.method("forward")
    if fwd is None:
        return None
    out_names = {n.targets[0].target.value for n in findall(fwd, m.Assign(  # type: ignore[attr-defined]
        targets=[m.AssignTarget(m.Name())], value=m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(packed)))))}
    for node in findall(fwd, m.Assign(targets=[m.AssignTarget(m.Tuple())], value=m.Call(
            func=m.Attribute(value=m.Name("self"), attr=m.Name()),
            args=[m.Arg(m.Name(m.MatchIfTrue(lambda n: n in out_names)))]))):
        helper = node.value.func.attr.value  # type: ignore[attr-defined]
        meth = info.method(helper)
        if meth is None:
            continue
        views = [c for c in findall(meth, m.Call(func=m.Attribute(attr=m.Name("view"))))
                 if len(c.args) >= 3 and code(c.args[-2].value) == "3"]  # type: ignore[attr-defined]
        rets = findall(meth, m.Return(value=m.Tuple()))
        local = {n.targets[0].target.value: n.value for n in findall(meth, m.Assign(  # type: ignore[attr-defined]
            targets=[m.AssignTarget(m.Name())]))}
        picks = [[code(sl.slice) for sl in sub.slice] for r in rets for el in r.value.elements  # type: ignore[attr-defined]
                 if isinstance(sub := strip_layout_calls(local.get(el.value.value, el.value) if isinstance(
                     el.value, cst.Name) else el.value), cst.Subscript)]
        if views and picks == [["...", "0", ":"], ["...", "1", ":"], ["...", "2", ":"]]:
            return helper
    return None


def table_activation_class(node: cst.CSTNode) -> str | None:
    """`ACT2CLS["xielu"]` -> "xielu": a transformers activation class picked by a constant key."""
    if m.matches(node, m.Subscript(value=m.Name("ACT2CLS"),
                                   slice=[m.SubscriptElement(slice=m.Index(value=m.SimpleString()))])):
        return node.slice[0].slice.value.evaluated_value  # type: ignore[attr-defined]
    return None


def engine_has_activation_class(node: cst.CSTNode) -> bool:
    """Every target has an engine class for this `ACT2CLS["key"]` (rule PT140 swaps it in)."""
    from porter.rules_data import targets

    key = table_activation_class(node)
    return key is not None and all(f"act_class_{key}" in t.symbols for t in targets().values())


def packed_split_call(st: cst.CSTNode, attr: str) -> cst.Call | None:
    """`q, k, v = self.attr(x)[.unsqueeze(..)].split(ARG, dim=...)`: the packed projection split in
    one statement; returns the split call."""
    if not m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Tuple(
            elements=[m.Element(m.Name()), m.Element(m.Name()), m.Element(m.Name())]))], value=m.Call(
                func=m.Attribute(attr=m.Name("split"))))])):
        return None
    call = st.body[0].value  # type: ignore[attr-defined]
    if not findall(call, m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(attr)))):
        return None
    return call


def query_prescale(
    fwd: cst.FunctionDef, q_attr: str, call: cst.Call
) -> tuple[cst.BinaryOperation, cst.BaseExpression, cst.BaseExpression] | None:
    """`self.q_proj(x) * self.scaling` in a forward whose attention call passes `scaling=1.0`
    (OPT): HF scales the query before the op and asks the op for no scale of its own.
    (the product, its projection call, its `self.<attr>` factor)"""
    if not any(a.keyword is not None and a.keyword.value == "scaling"
               and m.matches(a.value, m.Float("1.0") | m.Integer("1")) for a in call.args):
        return None
    for node in findall(fwd, m.BinaryOperation(operator=m.Multiply())):
        assert isinstance(node, cst.BinaryOperation)
        for proj, scale in ((node.left, node.right), (node.right, node.left)):
            if self_call_attr(proj) == q_attr and self_attr(scale) is not None:
                return node, proj, scale
    return None


def rope_guard(fwd: cst.FunctionDef, helper: str, hf_names: frozenset[str]) -> cst.If | None:
    """The `if` on an HF-only name that the rotary call sits under (`if position_embeddings is not
    None:`: the model hands NoPE layers None), else None."""
    for node in findall(fwd, m.If()):
        assert isinstance(node, cst.If)
        if names_in(node.test) & hf_names and findall(node.body, m.Call(func=m.Name(helper))):
            return node
    return None


def attention_call_names(idx: ModelIndex) -> set[str]:
    """Callables that are HF's attention op: `attention_interface`, or a module function taking
    (module, query, key, value, ...)."""
    names = {"attention_interface"}
    for fname, fn in idx.functions.items():
        ps = param_names(fn)
        if len(ps) >= 4 and ps[1].startswith("query") and ps[2].startswith("key"):
            names.add(fname)
    return names



def alibi_condition(idx: ModelIndex, classes: list[str], name: str) -> str | None:
    """The config test under which a kept forward builds the ALiBi bias: `if self.use_alibi: alibi =
    build(...)` with `self.use_alibi = config.alibi` in `__init__` (or `if self.config.alibi:`) gives
    "config.alibi"; None when the bias is built unconditionally."""
    for cls in classes:
        info = idx.classes[cls]
        fwd = info.method("forward")
        for node in findall(fwd, m.If(test=m.Attribute())) if fwd else []:
            builds = findall(node.body, m.Assign(targets=[m.AssignTarget(m.Name(name))], value=m.Call()))  # type: ignore[attr-defined]
            if not builds:
                continue
            test = node.test  # type: ignore[attr-defined]
            if m.matches(test, m.Attribute(value=m.Attribute(value=m.Name("self"), attr=m.Name("config")))):
                return f"config.{test.attr.value}"
            init = info.method("__init__")
            for a in findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))])) if init else []:
                if code(a.targets[0].target) == code(test) and m.matches(a.value, m.Attribute(value=m.Name("config"))):  # type: ignore[attr-defined]
                    return code(a.value)  # type: ignore[attr-defined]
    return None


def init_attrs(info: ClassInfo) -> dict[str, cst.BaseExpression]:
    """`self.x = <value>` of a class's `__init__` (the last binding of each attribute)."""
    out: dict[str, cst.BaseExpression] = {}
    init = info.method("__init__")
    if init is None:
        return out
    for node in findall(init, m.Assign(targets=[m.AssignTarget(target=m.Attribute(value=m.Name("self")))])):
        assert isinstance(node, cst.Assign)
        out[self_attr(node.targets[0].target)] = node.value  # type: ignore[index]
    return out


def head_size_attr(info: ClassInfo) -> str:
    """`self.head_dim`, or `self.head_size` where the class names its per-head size so (or, where it
    stores neither, the size its head split computes: `split_head_size`)."""
    attrs = init_attrs(info)
    if "head_dim" not in attrs and "head_size" not in attrs and (derived := split_head_size(info)):
        return derived
    return "self.head_dim" if "head_dim" in attrs else "self.head_size"


def split_head_size(info: ClassInfo) -> str | None:
    """A class that stores no per-head size but splits heads by shape (OpenAI GPT's `split_heads`:
    `x.view(*x.size()[:-1], self.n_head, x.size(-1) // self.n_head)`) of the thirds of its fused
    projection (`x.split(self.split_size, dim=2)`): `self.split_size // self.n_head`."""
    heads = set()
    for t in findall(info.node, m.Tuple()):
        elems = [e.value for e in t.elements]  # type: ignore[attr-defined]
        attrs = {self_attr(e) for e in elems} - {None}
        for e in elems:
            if m.matches(e, m.BinaryOperation(operator=m.FloorDivide())) and self_attr(e.right) in attrs:  # type: ignore[attr-defined]
                heads.add(self_attr(e.right))  # type: ignore[attr-defined]
    fwd = info.method("forward")
    widths = {self_attr(c.args[0].value) for c in findall(fwd, m.Call(func=m.Attribute(attr=m.Name("split"))))  # type: ignore[attr-defined]
              if c.args} - {None} if fwd else set()  # type: ignore[attr-defined]
    if len(heads) != 1 or len(widths) != 1:
        return split_shape_attr(info)
    return f"(self.{widths.pop()} // self.{heads.pop()})"


def split_shape_attr(info: ClassInfo) -> str | None:
    """The per-head size a class names otherwise (ChatGLM's `hidden_size_per_attention_head`): the last
    of the two `__init__` attributes each head split of forward ends its shape with
    (`q.view(q.size()[:-1] + (self.heads, self.X))`), when every such split names the same one."""
    fwd, attrs = info.method("forward"), init_attrs(info)
    lasts = set()
    for c in findall(fwd, m.Call(func=m.Attribute(attr=m.Name("view") | m.Name("reshape")))) if fwd else []:
        for t in findall(c, m.Tuple()):
            names = [self_attr(e.value) for e in t.elements]  # type: ignore[attr-defined]
            if len(names) == 2 and all(n in attrs for n in names):
                lasts.add(names[1])
    return f"self.{lasts.pop()}" if len(lasts) == 1 else None


def local_bindings(fwd: cst.FunctionDef) -> dict[str, cst.BaseExpression]:
    """Each local name of a function and the value it is first bound to."""
    out: dict[str, cst.BaseExpression] = {}
    for node in findall(fwd, m.Assign(targets=[m.AssignTarget(m.Name())])):
        out.setdefault(node.targets[0].target.value, node.value)  # type: ignore[attr-defined]  # first binding
    return out


_LAYOUT_CALLS = frozenset({"view", "reshape", "permute", "transpose", "contiguous", "size", "flatten",
                           "unflatten", "len", "ValueError"})


def layout_helper_methods(info: ClassInfo) -> frozenset[str]:
    """Methods that only change the layout of their first argument and return one tensor
    (GPT-J's `_split_heads(x, heads, dim, rotary)` / `_merge_heads`): on flat tokens, the identity."""
    out = set()
    for st in info.node.body.body:
        if not isinstance(st, cst.FunctionDef) or st.name.value in ("forward", "__init__") \
                or len(param_names(st)) < 2:
            continue
        calls = findall(st, m.Call())
        names = {(c.func.attr.value if isinstance(c.func, cst.Attribute) else dotted(c.func))  # type: ignore[attr-defined]
                 for c in calls}
        rets = findall(st, m.Return())
        if calls and names <= _LAYOUT_CALLS and rets and not any(
                isinstance(r.value, cst.Tuple) for r in rets):  # type: ignore[attr-defined]
            out.add(st.name.value)
    return frozenset(out)


_WHOLE = m.SubscriptElement(m.Slice(lower=None, upper=None, step=None))
_NEW = m.SubscriptElement(m.Index(m.Name("None")))
# x[:, None, :, None]: positions (batch, seq) against q/k/v (batch, heads, seq, head_dim)
HF_POSITION_BROADCAST = m.Subscript(slice=[_WHOLE, _NEW, _WHOLE, _NEW])
_POSITIONS = {"position_ids", "positions"}


def position_factor_helpers(idx: ModelIndex, classes: list[str]) -> frozenset[str]:
    """Module functions whose every return is `x[:, None, :, None]`, called by the forwards of
    CLASSES, each time with the positions as first argument."""
    shaped = {name for name, fn in idx.functions.items()
              if (rets := findall(fn, m.Return()))
              and all(r.value is not None and m.matches(r.value, HF_POSITION_BROADCAST) for r in rets)}  # type: ignore[attr-defined]
    called: dict[str, bool] = {}
    for cls in classes if shaped else []:
        fwd = idx.classes[cls].method("forward") if cls in idx.classes else None
        for call in findall(fwd, m.Call(func=m.Name())) if fwd else []:
            name = call.func.value  # type: ignore[attr-defined]
            if name in shaped:
                first = call.args[0] if call.args else None  # type: ignore[attr-defined]
                ok = first is not None and first.keyword is None and m.matches(
                    first.value, m.Name(m.MatchIfTrue(lambda n: n in _POSITIONS)))
                called[name] = called.get(name, True) and ok
    return frozenset(n for n, ok in called.items() if ok)


def scale_in_head_size(scale: str, call: cst.Call, head_size: str) -> str:
    """A scale hand-written attention computes from q/k/v's last dimension (`1 / math.sqrt(
    value.size(-1))`, `query.shape[-1] ** -0.5`): that dimension is the head size, which the
    engine's Attention is built with (the tensors do not exist in __init__)."""
    tensors = {a.value.value for a in call.args[1:4] if isinstance(a.value, cst.Name)}
    last = m.Call(func=m.Attribute(value=m.Name(m.MatchIfTrue(lambda n: n in tensors)), attr=m.Name("size")),
                  args=[m.Arg(m.UnaryOperation(operator=m.Minus(), expression=m.Integer("1")))]) | m.Subscript(
        value=m.Attribute(value=m.Name(m.MatchIfTrue(lambda n: n in tensors)), attr=m.Name("shape")),
        slice=[m.SubscriptElement(m.Index(m.UnaryOperation(operator=m.Minus(), expression=m.Integer("1"))))])
    expr = cst.parse_expression(scale)
    if not findall(expr, last):
        return scale
    return code(m.replace(expr, last, cst.parse_expression(head_size)))


def _dims_after(chain: list[tuple[str, list[str]]]) -> list[str] | None:
    """The dims of a [batch, seq, width] tensor after `unflatten(-1, (3, X))` and the
    unsqueeze/transpose/squeeze/permute calls of CHAIN ("3" marks the thirds), or None."""
    dims = ["b", "s", "w"]
    for name, args in chain:
        try:
            ints = [int(a) for a in args if a.lstrip("-").isdigit()]
            if name == "unflatten" and ints[:1] == [-1] and args[1:2] and args[1].startswith("(3,"):
                dims[-1:] = ["3", "h"]
            elif name == "unsqueeze" and len(ints) == 1:
                dims.insert(ints[0] if ints[0] >= 0 else len(dims) + 1 + ints[0], "1")
            elif name == "squeeze" and len(ints) == 1 and dims[ints[0]] == "1":
                del dims[ints[0]]
            elif name == "transpose" and len(ints) == 2:
                dims[ints[0]], dims[ints[1]] = dims[ints[1]], dims[ints[0]]
            elif name == "permute" and len(ints) == len(dims):
                dims = [dims[i] for i in ints]
            else:
                return None
        except (IndexError, ValueError):
            return None
    return dims


def thirds_to_front(value: cst.BaseExpression, out_name: str) -> bool:
    """`out.unflatten(-1, (3, X))[.unsqueeze(0).transpose(0, -2).squeeze(-2)]` (Baichuan's cut of
    its packed W_pack): the projection's output, [q; k; v], with its thirds moved to the front, so
    that `out[0]`, `out[1]`, `out[2]` are q, k and v (followed by what each call does to the dims)."""
    chain: list[tuple[str, list[str]]] = []
    node = value
    while isinstance(node, cst.Call) and isinstance(node.func, cst.Attribute):
        chain.append((node.func.attr.value, [code(a.value).replace(" ", "") for a in node.args]))
        node = node.func.value
    if not (isinstance(node, cst.Name) and node.value == out_name and chain):
        return False
    chain.reverse()
    dims = _dims_after(chain)
    return chain[0][0] == "unflatten" and dims is not None and dims[0] == "3"


def last_axis_part(e: cst.BaseExpression) -> tuple[str, str, str] | None:
    """`t[..., :n]` -> (t, "rot", n); `t[..., n:]` -> (t, "pass", n): a slice of the last axis."""
    if not (isinstance(e, cst.Subscript) and isinstance(e.value, cst.Name)) or not e.slice:
        return None
    *lead, last = e.slice
    if any(not m.matches(x, m.SubscriptElement(slice=m.Index(value=m.Ellipsis()))) for x in lead) or not lead:
        return None
    sl = last.slice
    if not isinstance(sl, cst.Slice) or sl.step is not None or (sl.lower is None) == (sl.upper is None):
        return None
    return (e.value.value, "rot", code(sl.upper)) if sl.lower is None else (e.value.value, "pass", code(sl.lower))
