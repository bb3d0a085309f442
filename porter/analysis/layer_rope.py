"""Per-layer rotary: which layers rotate, and with which table, read from how the model hands
each layer its cos/sin.

Some models give only some layers rotary (the others have no position encoding, NoPE): the
attention rotates under `if position_embeddings is not None:` and the model passes each layer
either a table or None, chosen by a config list (`theta = config.layer_rope_theta[i]`,
`tables[theta] if theta else None`). The engine's ports build the rotary only in the layers that
use it (`self.use_rope = ...; if self.use_rope: self.rotary_emb = get_rope(...)`), so the port
needs the choice and the table as expressions of `config` and `layer_idx`. This module follows
the cos/sin argument from the attention up the callers to the loop over the layers, and reads
both there; anything it cannot follow exactly gives None (the planner then refuses).
"""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import assigned_names, code, findall, loop_module, names_in, param_names, self_attr
from porter.analysis.index import ClassInfo, ModelIndex


@dataclass(frozen=True)
class LayerRope:
    when: str  # the test, of `config` and `layer_idx`, true for the layers that rotate
    params: str  # their rope_parameters, of `config` and `layer_idx`
    model_cls: str  # the class that builds the tables (and loops over the layers)
    tables: tuple[str, ...]  # its attributes holding the rotary modules (removed in the port)


class _Subst(cst.CSTTransformer):
    """Locals by their values, `self.config` by `config`, the loop's index by `layer_idx`."""

    def __init__(self, local: dict[str, cst.BaseExpression], index: str | dict[str, cst.BaseExpression] | None) -> None:
        self.local, self.index, self.depth = local, index, 0

    def leave_Attribute(self, original, updated):
        if m.matches(updated, m.Attribute(value=m.Name("self"), attr=m.Name("config"))):
            return cst.Name("config")
        return updated

    def leave_Name(self, original, updated):
        if updated.value == self.index:
            return cst.Name("layer_idx")
        if isinstance(self.index, dict) and updated.value in self.index:  # zip(A, self.layers): A[layer_idx]
            return self.index[updated.value]
        if updated.value in self.local and self.depth < 8:
            self.depth += 1
            return self.local[updated.value].visit(self)
        return updated


def _caller_args(idx: ModelIndex, cls: str, param: str):
    """(caller class, its forward, the expression passed for `param`, the loop index name) for
    every call of an instance of `cls` in another class's forward."""
    fwd_params = [p for p in param_names(idx.classes[cls].method("forward")) if p != "self"]
    for info in idx.classes.values():
        fwd = info.method("forward")
        if fwd is None:
            continue
        for attr, sub in info.submodules.items():
            if sub.ctor != cls:
                continue
            calls = [(c, None) for c in findall(fwd, m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(attr))))]
            for loop in findall(fwd, m.For()):
                lm = loop_module(loop)  # type: ignore[arg-type]
                if lm and lm[1] == attr:
                    target = loop.target  # type: ignore[attr-defined]
                    index = code(target.elements[0].value) if isinstance(target, cst.Tuple) else None
                    calls += [(c, index) for c in findall(loop.body, m.Call(func=m.Name(lm[0])))]  # type: ignore[attr-defined]
                elif (zipped := _zip_loop(loop, attr)) is not None:  # type: ignore[arg-type]
                    calls += [(c, zipped[1]) for c in findall(loop.body, m.Call(func=m.Name(zipped[0])))]  # type: ignore[attr-defined]
            for call, index in calls:
                yield info, fwd, _arg(call, param, fwd_params), index


def _zip_loop(loop: cst.For, attr: str) -> tuple[str, dict[str, cst.BaseExpression]] | None:
    """`for a, layer in zip(A, self.<attr>):` -> ("layer", {"a": A[layer_idx]}): the i-th element
    of each other sequence goes with layer i (`self.config` read as `config`)."""
    it, target = loop.iter, loop.target
    if not (m.matches(it, m.Call(func=m.Name("zip"))) and isinstance(target, cst.Tuple)
            and all(isinstance(e.value, cst.Name) for e in target.elements)):
        return None
    args = [a for a in it.args if a.star == ""]  # type: ignore[attr-defined]
    at = [i for i, a in enumerate(args) if a.keyword is None and self_attr(a.value) == attr]
    if len(args) != len(it.args) or len(at) != 1 or any(a.keyword is not None and a.keyword.value != "strict"  # type: ignore[attr-defined]
                                                        for a in args):
        return None
    seqs = [a for a in args if a.keyword is None]
    if len(seqs) != len(target.elements):
        return None
    index = {e.value.value: cst.parse_expression(f"{code(a.value)}[layer_idx]").visit(_Subst({}, None))  # type: ignore[attr-defined]
             for i, (e, a) in enumerate(zip(target.elements, seqs)) if i != at[0]}
    return target.elements[at[0]].value.value, index  # type: ignore[attr-defined]


def _arg(call: cst.Call, param: str, params: list[str]) -> cst.BaseExpression | None:
    for i, a in enumerate(call.args):
        if a.keyword is not None and a.keyword.value == param:
            return a.value
        if a.keyword is None and a.star == "" and i < len(params) and params[i] == param:
            return a.value
    return None


def _locals(fn: cst.FunctionDef) -> dict[str, cst.BaseExpression]:
    out: dict[str, cst.BaseExpression] = {}
    for node in findall(fn, m.Assign(targets=[m.AssignTarget(m.Name())])):
        out.setdefault(node.targets[0].target.value, node.value)  # type: ignore[attr-defined]
    return out


def layer_rope(idx: ModelIndex, cls: str, param: str, is_rotary) -> LayerRope | None:
    """The per-layer rotary choice for attention `cls`, rotated only when its forward parameter
    `param` (cos/sin) is given; `is_rotary(ClassInfo)` tells a rotary module."""
    found = [(info, fwd, arg, index) for info, fwd, arg, index in _caller_args(idx, cls, param) if arg is not None]
    if len(found) != 1:
        return None
    info, fwd, arg, index = found[0]
    if isinstance(arg, cst.Name) and arg.value in param_names(fwd):  # handed on unchanged: one level up
        return layer_rope(idx, info.name, arg.value, is_rotary)
    if isinstance(arg, cst.Name) and (optional := _optional_table(idx, info, fwd, arg.value, is_rotary)):
        return optional
    local = _locals(fwd)
    while isinstance(arg, cst.Name) and arg.value in local:
        arg = local.pop(arg.value)
    if index is not None and (by_type := _by_layer_type(idx, info, local, arg, _Subst(_locals(fwd), index),
                                                        is_rotary)) is not None:
        return by_type
    if index is not None and (by_key := _by_rotary_keys(idx, info, local, arg, _Subst(_locals(fwd), index),
                                                        is_rotary)) is not None:
        return by_key
    if not m.matches(arg, m.IfExp(orelse=m.Name("None"))) or index is None:
        return None
    subst = _Subst(_locals(fwd), index)
    when = arg.test.visit(subst)  # type: ignore[attr-defined]
    if not names_in(when) <= {"config", "layer_idx", "None"}:
        return None
    table = _table(idx, info, fwd, arg.body, subst, is_rotary) or _one_table(idx, info, fwd, arg.body, is_rotary)  # type: ignore[attr-defined]
    if table is None:
        return None
    params, attrs = table
    return LayerRope(code(when), params, info.name, attrs)


def _by_layer_type(idx: ModelIndex, info: ClassInfo, local: dict[str, cst.BaseExpression],
                   arg: cst.BaseExpression, subst: _Subst, is_rotary) -> LayerRope | None:
    """`tables[KEY]` where `tables = {t: (self.rotary(h, pos, t) if TEST else None) for t in ...}`
    and the one rotary module builds its table from `config.rope_parameters[t]` (one table per
    layer type, None for the NoPE types): the layer rotates when TEST holds for t = KEY, with the
    rope_parameters of its key."""
    if not m.matches(arg, m.Subscript(value=m.Name(), slice=[m.SubscriptElement(m.Index())])):
        return None
    comp = local.get(arg.value.value) or _filled_by_loop(info.method("forward"), arg.value.value)  # type: ignore[attr-defined]
    rotary = m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name()))
    if not m.matches(comp, m.DictComp(key=m.Name(), value=m.IfExp(body=rotary, orelse=m.Name("None")),
                                      for_in=m.CompFor(target=m.Name(), ifs=[], inner_for_in=None))):
        return None
    t = comp.key.value  # type: ignore[attr-defined]
    call = comp.value.body  # type: ignore[attr-defined]
    if comp.for_in.target.value != t or not any(m.matches(a.value, m.Name(t)) for a in call.args):  # type: ignore[attr-defined]
        return None
    sub = info.submodules.get(self_attr(call.func) or "")
    rot = idx.classes.get(sub.ctor) if sub else None
    if rot is None or not is_rotary(rot) or not findall(rot.node, m.Subscript(
            value=m.Attribute(attr=m.Name("rope_parameters")), slice=[m.SubscriptElement(m.Index(m.Name()))])):
        return None
    key = arg.slice[0].slice.value.visit(subst)  # type: ignore[attr-defined]
    test = _Rename(t, key)
    when = comp.value.test.visit(test).visit(subst)  # type: ignore[attr-defined]
    if not names_in(when) <= {"config", "layer_idx", "None"} or not names_in(key) <= {"config", "layer_idx"}:
        return None
    return LayerRope(code(when), f"config.rope_parameters[{code(key)}]", info.name, ())


def _filled_by_loop(fwd: cst.FunctionDef | None, name: str) -> cst.DictComp | None:
    """`NAME = {}` (alone or in a tuple of empty dicts) and then one loop `for t in ITER:` whose
    `if TEST: ... else: ...` sets `NAME[t]` once in each arm, to None in one and to a value in the
    other, and NAME nowhere else: the same dict as `{t: (VALUE if not TEST else None) for t in ITER}`
    (the test negated exactly: `is` / `is not`, `==` / `!=`, else `not (...)`)."""
    if fwd is None:
        return None
    item = m.Subscript(value=m.Name(name), slice=[m.SubscriptElement(m.Index(m.Name()))])
    sets = findall(fwd, m.Assign(targets=[m.AssignTarget(item)]))
    binds = [a for a in findall(fwd, m.Assign()) if name in {n for t in a.targets  # type: ignore[attr-defined]
                                                           for n in assigned_names(t.target)}]
    if len(sets) != 2 or len(binds) != 1 or not _empty_dict_for(binds[0], name):
        return None
    loops = [f for f in findall(fwd, m.For(target=m.Name(), orelse=None)) if sets[0] in findall(f, m.Assign())]
    if len(loops) != 1 or not all(s in findall(loops[0], m.Assign()) for s in sets):
        return None
    loop = loops[0]
    t = loop.target.value  # type: ignore[attr-defined]
    arms = [st for st in loop.body.body if isinstance(st, cst.If)]  # type: ignore[attr-defined]
    if len(arms) != 1 or not isinstance(arms[0].orelse, cst.Else):
        return None
    branch = arms[0]
    values = []
    for block in (branch.body, branch.orelse.body):  # type: ignore[union-attr]
        got = [a for a in findall(block, m.Assign(targets=[m.AssignTarget(item)])) if a in sets]
        if len(got) != 1 or got[0].targets[0].target.slice[0].slice.value.value != t:  # type: ignore[attr-defined]
            return None
        values.append(got[0].value)  # type: ignore[attr-defined]
    if m.matches(values[0], m.Name("None")):
        test, value = _negated(branch.test), values[1]
    elif m.matches(values[1], m.Name("None")):
        test, value = branch.test, values[0]
    else:
        return None
    return cst.DictComp(key=cst.Name(t), value=cst.IfExp(test=test, body=value, orelse=cst.Name("None")),
                        for_in=cst.CompFor(target=cst.Name(t), iter=loop.iter))


def _empty_dict_for(assign: cst.Assign, name: str) -> bool:
    """`NAME = {}`, or `..., NAME, ... = ..., {}, ...` (the element at NAME's place an empty dict)."""
    target, value = assign.targets[0].target, assign.value
    if isinstance(target, cst.Name):
        return m.matches(value, m.Dict(elements=[]))
    if isinstance(target, cst.Tuple) and isinstance(value, cst.Tuple) and len(target.elements) == len(value.elements):
        return any(m.matches(te.value, m.Name(name)) and m.matches(ve.value, m.Dict(elements=[]))
                   for te, ve in zip(target.elements, value.elements))
    return False


def _negated(test: cst.BaseExpression) -> cst.BaseExpression:
    flips = {cst.Is: cst.IsNot, cst.IsNot: cst.Is, cst.Equal: cst.NotEqual, cst.NotEqual: cst.Equal}
    if isinstance(test, cst.Comparison) and len(test.comparisons) == 1 and type(test.comparisons[0].operator) in flips:
        op = flips[type(test.comparisons[0].operator)]()
        return test.with_changes(comparisons=[test.comparisons[0].with_changes(operator=op)])
    return cst.UnaryOperation(operator=cst.Not(), expression=test.with_changes(
        lpar=[cst.LeftParen()], rpar=[cst.RightParen()]))


class _Rename(cst.CSTTransformer):
    """A comprehension's variable by the expression it stands for."""

    def __init__(self, name: str, value: cst.BaseExpression) -> None:
        self.name, self.value = name, value

    def leave_Name(self, original, updated):
        return self.value if updated.value == self.name else updated


def _table(idx: ModelIndex, info: ClassInfo, fwd: cst.FunctionDef, body: cst.BaseExpression,
           subst: _Subst, is_rotary) -> tuple[str, tuple[str, ...]] | None:
    """(rope_parameters, rotary attributes) of the table a layer is handed: `tables[key]` where
    `tables = {r.config.rope_parameters[NAME]: r(...) for r in self.rotary_embs}` and `__init__`
    builds each `r` from a copy of the config with `rope_parameters = {**config.rope_parameters,
    NAME: value}`: the layer's table is the config's with NAME set to the key."""
    local = _locals(fwd)
    if not m.matches(body, m.Subscript(value=m.Name(), slice=[m.SubscriptElement(m.Index())])):
        return None
    comp = local.get(body.value.value)  # type: ignore[attr-defined]
    if not m.matches(comp, m.DictComp(for_in=m.CompFor(target=m.Name(), iter=m.Attribute(value=m.Name("self")),
                                                       ifs=[], inner_for_in=None))):
        return None
    r = comp.for_in.target.value  # type: ignore[attr-defined]
    attr = self_attr(comp.for_in.iter)  # type: ignore[attr-defined]
    key = m.Subscript(value=m.Attribute(value=m.Attribute(value=m.Name(r), attr=m.Name("config")),
                                        attr=m.Name("rope_parameters")),
                      slice=[m.SubscriptElement(m.Index(m.SimpleString()))])
    if not m.matches(comp.key, key) or not m.matches(comp.value, m.Call(func=m.Name(r))):  # type: ignore[attr-defined]
        return None
    name = comp.key.slice[0].slice.value.value  # type: ignore[attr-defined]
    if not _built_per_value(idx, info, attr, name, is_rotary):
        return None
    layer_key = body.slice[0].slice.value.visit(subst)  # type: ignore[attr-defined]
    if not names_in(layer_key) <= {"config", "layer_idx"}:
        return None
    return f"{{**config.rope_parameters, {name}: {code(layer_key)}}}", (attr,)


def _one_table(idx: ModelIndex, info: ClassInfo, fwd: cst.FunctionDef, body: cst.BaseExpression,
               is_rotary) -> tuple[str, tuple[str, ...]] | None:
    """(rope_parameters, rotary attributes) of the one table the model builds (`t = self.R(h, pos)`,
    `self.R = Rotary(config)` or `Rotary(config=config)`) and hands the layers that rotate: the
    config's own rope_parameters (LaraMini: `t if layer_type == "sliding_attention" else None`)."""
    value = _locals(fwd).get(body.value) if isinstance(body, cst.Name) else None
    attr = self_attr(value.func) if m.matches(value, m.Call(func=m.Attribute(value=m.Name("self")))) else None  # type: ignore[union-attr]
    sub = info.submodules.get(attr or "")
    rot = idx.classes.get(sub.ctor) if sub and sub.ctor else None
    if rot is None or not is_rotary(rot) or len(sub.call.args) != 1 or not m.matches(  # type: ignore[union-attr]
            sub.call.args[0].value, m.Name("config")):  # type: ignore[union-attr]
        return None
    return "config.rope_parameters", (attr,)  # type: ignore[return-value]


def _built_per_value(idx: ModelIndex, info: ClassInfo, attr: str, name: str, is_rotary) -> bool:
    """`__init__` fills `self.<attr>` with rotary modules only in a loop `for v in ...:` whose body
    builds each from a config whose `rope_parameters` is `{**config.rope_parameters, NAME: v}`."""
    init = info.method("__init__")
    appends = m.Call(func=m.Attribute(value=m.Attribute(value=m.Name("self"), attr=m.Name(attr)), attr=m.Name("append")))
    loops = [f for f in findall(init, m.For(target=m.Name())) if findall(f, appends)] if init else []
    if len(loops) != 1:
        return False
    loop = loops[0]
    v = loop.target.value  # type: ignore[attr-defined]
    for call in findall(loop, appends):
        built = call.args[0].value  # type: ignore[attr-defined]
        if not (isinstance(built, cst.Call) and isinstance(built.func, cst.Name)
                and built.func.value in idx.classes and is_rotary(idx.classes[built.func.value])
                and len(built.args) == 1 and isinstance(built.args[0].value, cst.Name)):
            return False
        cfg = built.args[0].value.value
        table = m.Dict(elements=[
            m.StarredDictElement(m.Attribute(value=m.Name("config"), attr=m.Name("rope_parameters"))),
            m.DictElement(key=m.SimpleString(name), value=m.Name(v))])
        assigns = findall(loop, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name(cfg), attr=m.Name("rope_parameters")))]))
        if len(assigns) != 1 or not m.matches(assigns[0].value, table):  # type: ignore[attr-defined]
            return False
    return True


def _optional_table(idx: ModelIndex, info: ClassInfo, fwd: cst.FunctionDef, name: str,
                    is_rotary) -> LayerRope | None:
    """One table for every layer, or none, chosen by config: `__init__` builds `self.R =
    Rotary(config) if TEST else None`, and the forward hands the layers NAME, bound `NAME = None`
    and then only under `if self.R is not None:` to `self.R(...)`. Every layer rotates when TEST
    holds, with the config's own rope_parameters."""
    init = info.method("__init__")
    binds = findall(fwd, m.Assign(targets=[m.AssignTarget(m.Name(name))]))
    if init is None or len(binds) != 2 or not m.matches(binds[0].value, m.Name("None")):  # type: ignore[attr-defined]
        return None
    guarded = [st for st in findall(fwd, m.If(test=m.Comparison(
        left=m.Attribute(value=m.Name("self")), comparisons=[m.ComparisonTarget(m.IsNot(), m.Name("None"))]),
        orelse=None)) if binds[1] in findall(st, m.Assign())]  # type: ignore[attr-defined]
    if len(guarded) != 1:
        return None
    attr = self_attr(guarded[0].test.left)  # type: ignore[attr-defined]
    if not m.matches(binds[1].value, m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(attr)))):  # type: ignore[attr-defined]
        return None
    built = [a.value for a in findall(init, m.Assign(targets=[m.AssignTarget(  # type: ignore[attr-defined]
        m.Attribute(value=m.Name("self"), attr=m.Name(attr)))]))]
    if len(built) != 1 or not m.matches(built[0], m.IfExp(body=m.Call(func=m.Name(), args=[m.Arg(m.Name("config"))]),
                                                          orelse=m.Name("None"))):
        return None
    rotary = idx.classes.get(built[0].body.func.value)  # type: ignore[attr-defined]
    when = built[0].test  # type: ignore[attr-defined]
    if rotary is None or not is_rotary(rotary) or not names_in(when) <= {"config"}:
        return None
    return LayerRope(code(when), "config.rope_parameters", info.name, (attr,))


_LAYER_TYPES = m.Attribute(value=m.Name("config") | m.Attribute(value=m.Name("self"), attr=m.Name("config")),
                           attr=m.Name("layer_types"))
_SAME_KEYS = ("sorted", "set", "list", "tuple", "frozenset", "dict.fromkeys")


def _by_rotary_keys(idx: ModelIndex, info: ClassInfo, local: dict[str, cst.BaseExpression],
                    arg: cst.BaseExpression, subst: _Subst, is_rotary) -> LayerRope | None:
    """`tables.get(KEY)` where `tables = {t: self.R(h, pos, t) for t in self.R.K}`, KEY is the
    layer's `config.layer_types[layer_idx]`, and the rotary module R fills the dict `self.K` in
    `__init__` in one loop over the config's layer types that skips the types whose test holds
    (`p = config.rope_parameters[t]; if p is None: continue; self.K[t] = ...`; Ergo): a layer
    rotates when that test does not hold for its type, with the rope_parameters of its type."""
    get = m.Call(func=m.Attribute(value=m.Name(), attr=m.Name("get")), args=[m.Arg(keyword=None, star="")])
    if not m.matches(arg, get):
        return None
    comp = local.get(arg.func.value.value)  # type: ignore[attr-defined]
    keys = m.Attribute(value=m.Attribute(value=m.Name("self"), attr=m.Name()), attr=m.Name())
    if not m.matches(comp, m.DictComp(key=m.Name(), value=m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name())),
                                      for_in=m.CompFor(target=m.Name(), iter=keys, ifs=[], inner_for_in=None))):
        return None
    t, call, it = comp.key.value, comp.value, comp.for_in.iter  # type: ignore[attr-defined]
    if comp.for_in.target.value != t or self_attr(call.func) != self_attr(it.value) \
            or not any(m.matches(a.value, m.Name(t)) for a in call.args):  # type: ignore[attr-defined]
        return None
    sub = info.submodules.get(self_attr(call.func) or "")
    rot = idx.classes.get(sub.ctor) if sub and sub.ctor else None
    if rot is None or not is_rotary(rot) or len(sub.call.args) != 1 or not m.matches(  # type: ignore[union-attr]
            sub.call.args[0].value, m.Name("config")) or not findall(rot.node, m.Subscript(  # type: ignore[union-attr]
            value=m.Attribute(attr=m.Name("rope_parameters")), slice=[m.SubscriptElement(m.Index(m.Name()))])):
        return None
    key = arg.args[0].value.visit(subst)  # type: ignore[attr-defined]
    kept = _kept_keys(rot, it.attr.value)  # type: ignore[attr-defined]
    if kept is None or code(key) != "config.layer_types[layer_idx]":
        return None
    when = kept[1].visit(_Rename(kept[0], key)).visit(_Subst({}, None))
    if not names_in(when) <= {"config", "layer_idx", "None"}:
        return None
    return LayerRope(code(when), f"config.rope_parameters[{code(key)}]", info.name, ())


def _kept_keys(rot: ClassInfo, attr: str) -> tuple[str, cst.BaseExpression] | None:
    """(t, TEST): `__init__` binds `self.<attr> = {}` and sets `self.<attr>[t] = ...` once, at the
    top of the body of a loop `for t in <the config's layer types>:`, after nothing but local
    bindings and `if T: continue`; the class changes the dict nowhere else. TEST (of t) holds for the
    types set: every T negated, the loop's locals by their values."""
    init = rot.method("__init__")
    d = m.Attribute(value=m.Name("self"), attr=m.Name(attr))
    item = m.Subscript(value=d, slice=[m.SubscriptElement(m.Index(m.Name()))])
    sets = findall(rot.node, m.Assign(targets=[m.AssignTarget(item)]))
    binds = findall(rot.node, m.Assign(targets=[m.AssignTarget(d)]))
    changed = findall(rot.node, m.Call(func=m.Attribute(value=d))) + findall(rot.node, m.Del()) \
        + findall(rot.node, m.AugAssign(target=item))
    if init is None or len(sets) != 1 or len(binds) != 1 or changed or not m.matches(binds[0].value, m.Dict(elements=[])):  # type: ignore[attr-defined]
        return None
    loops = [f for f in findall(init, m.For(target=m.Name(), orelse=None))
             if any(sets[0] in findall(st, m.Assign()) for st in f.body.body if isinstance(st, cst.SimpleStatementLine))]  # type: ignore[attr-defined]
    if len(loops) != 1 or not _all_layer_types(init, loops[0].iter):  # type: ignore[attr-defined]
        return None
    t = loops[0].target.value  # type: ignore[attr-defined]
    if sets[0].targets[0].target.slice[0].slice.value.value != t:  # type: ignore[attr-defined]
        return None
    tests, local = [], {}
    for st in loops[0].body.body:  # type: ignore[attr-defined]
        if sets[0] in findall(st, m.Assign()):
            break
        if m.matches(st, m.If(body=m.IndentedBlock(body=[m.SimpleStatementLine(body=[m.Continue()])]), orelse=None)):
            tests.append(_negated(st.test.visit(_Subst(local, None))))  # type: ignore[attr-defined]
        elif m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())])])):
            local[st.body[0].targets[0].target.value] = st.body[0].value.visit(_Subst(local, None))  # type: ignore[attr-defined]
        else:
            return None
    if not tests:
        return None
    test = tests[0]
    for more in tests[1:]:
        test = cst.BooleanOperation(left=test, operator=cst.And(), right=more)
    return t, test


def _all_layer_types(init: cst.FunctionDef, it: cst.BaseExpression) -> bool:
    """ITER runs over every one of the config's layer types (`config.layer_types`, through `self.X =
    sorted(set(config.layer_types))` and other wrappers that keep every element)."""
    for _ in range(4):
        if (attr := self_attr(it)) is not None:
            bound = [a.value for a in findall(init, m.Assign(targets=[m.AssignTarget(  # type: ignore[attr-defined]
                m.Attribute(value=m.Name("self"), attr=m.Name(attr)))]))]
            if len(bound) != 1:
                return False
            it = bound[0]
        while isinstance(it, cst.Call) and code(it.func) in _SAME_KEYS and len(it.args) == 1 \
                and it.args[0].keyword is None and it.args[0].star == "":
            it = it.args[0].value
        if m.matches(it, _LAYER_TYPES):
            return True
    return False
