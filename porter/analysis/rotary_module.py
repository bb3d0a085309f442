"""Rotary modules of remote code (issue 23), read by what they compute.

Remote code of its time builds the rotary as a module of its own that returns a cos/sin cache
(`self.rotary_emb(seq_len)`, sized by a sequence length and sliced or indexed by positions), and
passes that cache down the layers as a forward argument of any name (`rotary_pos_emb`). What it
computes is the standard rotary: inverse frequencies `1 / BASE ** (arange(0, DIM, 2) / DIM)` from
its constructor's arguments. The engine's `get_rope` computes the same from positions, so:

- :func:`table_params`: the attention forward's parameters the cos/sin given to its rotary helper
  come from (through unpacking and slicing): HF-only once the engine rotates from positions;
- :func:`module_rope`: (base, rotated dims) of such a module, as expressions of `config` read from
  where the model builds it (`RotaryEmbedding(head_dim, base=config.rotary_emb_base)`), for a
  config class with no `rope_parameters`.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, findall, names_in, param_names
from porter.analysis.index import ModelIndex


def _root(e: cst.BaseExpression) -> str | None:
    """The tensor an expression reads (`cos[:, -n:]` -> cos, `x.to(q.dtype)` -> x)."""
    while True:
        if isinstance(e, cst.Name):
            return e.value
        if isinstance(e, cst.Subscript):
            e = e.value
        elif isinstance(e, cst.Call) and isinstance(e.func, cst.Attribute):
            e = e.func.value
        else:
            return None


def _sources(fwd: cst.FunctionDef) -> dict[str, set[str]]:
    """local -> the names its value is read from (element by element for `a, b = x, y`)."""
    out: dict[str, set[str]] = {}
    for node in findall(fwd, m.Assign()):
        for t in node.targets:  # type: ignore[attr-defined]
            tgt, val = t.target, node.value  # type: ignore[attr-defined]
            if isinstance(tgt, cst.Name):
                pairs = [(tgt, val)]
            elif isinstance(tgt, cst.Tuple) and isinstance(val, cst.Tuple) and len(val.elements) == len(tgt.elements):
                pairs = [(a.value, b.value) for a, b in zip(tgt.elements, val.elements)]
            elif isinstance(tgt, cst.Tuple):
                pairs = [(a.value, val) for a in tgt.elements]
            else:
                continue
            for name, value in pairs:
                if isinstance(name, cst.Name) and (r := _root(value)) is not None:
                    out.setdefault(name.value, set()).add(r)
    return out


def table_params(fwd: cst.FunctionDef | None, helper: str) -> set[str]:
    """Parameters of FWD the cos/sin arguments of its `helper(q, k, cos, sin)` calls come from."""
    if fwd is None:
        return set()
    params = set(param_names(fwd)) - {"self"}
    sources = _sources(fwd)
    found: set[str] = set()
    for call in findall(fwd, m.Call(func=m.Name(helper))):
        # `helper(q, k, cos, sin)`, or one tensor per call from one cache (`helper(q, rope_cache)`)
        tables = call.args[2:4] if len(call.args) > 2 else call.args[1:]  # type: ignore[attr-defined]
        todo = [r for a in tables if (r := _root(a.value)) is not None]
        seen: set[str] = set()
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in params:
                found.add(name)
            todo += sources.get(name, ())
    return found


_POWER = m.BinaryOperation(operator=m.Power(), right=m.BinaryOperation(operator=m.Divide()))
_ARANGE = m.Call(func=m.Attribute(value=m.Name("torch"), attr=m.Name("arange")))


def pairs_last(fn: cst.FunctionDef) -> bool:
    """A rotary helper that rotates adjacent pairs: it reshapes the last axis into pairs
    (`x.reshape(b, np, sq, rot_dim // 2, 2)`) and reads both of each (`xshaped[..., 0]`, `[..., 1]`)."""
    pairs = any(c.args and m.matches(c.args[-1].value, m.Integer("2"))  # type: ignore[attr-defined]
                for c in findall(fn, m.Call(func=m.Attribute(attr=m.Name("reshape") | m.Name("view")))))
    ellipsis = m.SubscriptElement(m.Index(m.Ellipsis()))
    read = {code(s.slice[1].slice.value) for s in findall(fn, m.Subscript(slice=[ellipsis, m.SubscriptElement(
        m.Index(m.Integer()))]))}  # type: ignore[attr-defined]
    return pairs and read == {"0", "1"}


def _inv_freq(init: cst.FunctionDef) -> tuple[cst.BaseExpression, str] | None:
    """(base, dim) of `BASE ** (torch.arange(0, DIM, 2)... / DIM)` in __init__: DIM a parameter,
    BASE a parameter or a local computed from parameters only (`base = 10000 * rope_ratio`)."""
    params = set(param_names(init))
    local = {n: v for n, v in _self_free_locals(init).items() if names_in(v) <= params}
    for p in findall(init, _POWER):
        base, ratio = p.left, p.right  # type: ignore[attr-defined]
        if isinstance(base, cst.Name) and base.value in local:
            base = local[base.value]
        aranges = findall(ratio.left, _ARANGE)
        if not (names_in(base) and names_in(base) <= params and aranges
                and isinstance(ratio.right, cst.Name) and ratio.right.value in params):
            continue
        a = aranges[0].args  # type: ignore[attr-defined]
        if len(a) >= 3 and code(a[0].value) == "0" and code(a[2].value) == "2" \
                and code(a[1].value) == ratio.right.value:
            return base, ratio.right.value
    return None


def _self_free_locals(init: cst.FunctionDef) -> dict[str, cst.BaseExpression]:
    out: dict[str, cst.BaseExpression] = {}
    for node in findall(init, m.Assign(targets=[m.AssignTarget(m.Name())])):
        out.setdefault(node.targets[0].target.value, node.value)  # type: ignore[attr-defined]
    return out


def _bound(ctor: cst.Call, init: cst.FunctionDef, param: str) -> cst.BaseExpression | None:
    """The argument CTOR passes for INIT's parameter PARAM (else its default)."""
    names = [p.name.value for p in init.params.params]
    for i, a in enumerate(ctor.args):
        if (a.keyword is not None and a.keyword.value == param) or \
                (a.keyword is None and not a.star and i + 1 < len(names) and names[i + 1] == param):
            return a.value
    default = next((p.default for p in init.params.params if p.name.value == param), None)
    return default


def _in_config_terms(e: cst.BaseExpression, local: dict[str, cst.BaseExpression],
                     attrs: dict[str, cst.BaseExpression]) -> str | None:
    """E with the locals and `self.X` attributes of the building __init__ replaced by their values:
    an expression of `config` and literals only, else None."""

    def wrapped(v: cst.BaseExpression) -> cst.BaseExpression:
        return v.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()]) \
            if isinstance(v, cst.BinaryOperation) and not v.lpar else v

    class _Sub(cst.CSTTransformer):
        def visit_Attribute(self, node):
            return False  # `config.head_dim`: its attribute name is no local

        def leave_Attribute(self, original, updated):
            if m.matches(updated, m.Attribute(value=m.Name("self"))) and updated.attr.value in attrs:
                return wrapped(attrs[updated.attr.value])
            if isinstance(updated.value, cst.Name) and updated.value.value in local:
                return updated.with_changes(value=wrapped(local[updated.value.value]))
            return updated

        def leave_Name(self, original, updated):
            return wrapped(local[updated.value]) if updated.value in local else updated

    for _ in range(4):
        e = e.visit(_Sub())  # type: ignore[assignment]
    if names_in(e) - {"config", "None", "int"}:
        return None
    if isinstance(e, cst.BinaryOperation) and e.lpar:
        e = e.with_changes(lpar=[], rpar=[])
    return code(e)


def _self_attrs(init: cst.FunctionDef) -> dict[str, cst.BaseExpression]:
    """`self.X` -> its value in __init__; an attribute each arm of a top-level `if T: ... else: ...`
    assigns (Qwen-1's `self.rotary_ndims`, None or a part of the head by `config.rotary_pct`) is
    `(A if T else B)`."""
    out: dict[str, cst.BaseExpression] = {}
    for st in init.body.body:
        if not isinstance(st, cst.If) or not isinstance(st.orelse, cst.Else):
            continue
        arms = [_arm_attrs(st.body), _arm_attrs(st.orelse.body)]
        for name in sorted(set(arms[0]) & set(arms[1])):
            out[name] = cst.IfExp(test=st.test, body=arms[0][name], orelse=arms[1][name],
                                  lpar=[cst.LeftParen()], rpar=[cst.RightParen()])
    for node in findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))])):
        out.setdefault(node.targets[0].target.attr.value, node.value)  # type: ignore[attr-defined]
    return out


def _arm_attrs(block: cst.BaseSuite) -> dict[str, cst.BaseExpression]:
    return {n.targets[0].target.attr.value: n.value  # type: ignore[attr-defined]
            for n in findall(block, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))]))}


def module_rope(idx: ModelIndex, rotary_classes: list[str]) -> tuple[str, str] | None:
    """(base, dims) of the rotary module the model builds from config (see the module docstring)."""
    from porter.analysis.layouts import local_bindings

    for cls in rotary_classes:
        info = idx.classes.get(cls)
        init = info.method("__init__") if info else None
        found = _inv_freq(init) if init is not None else None
        if found is None:
            continue
        for owner in idx.classes.values():
            for sub in owner.submodules.values():
                oinit = owner.method("__init__")
                if sub.ctor != cls or oinit is None or not isinstance(sub.call, cst.Call):
                    continue
                base_expr, dim_param = found
                args = {n: _bound(sub.call, init, n) for n in names_in(base_expr) | {dim_param}}  # type: ignore[arg-type]
                if any(v is None for v in args.values()):
                    return None
                base, dim = _substitute(base_expr, args), args[dim_param]
                local, attrs = local_bindings(oinit), _self_attrs(oinit)
                theta, dims = _in_config_terms(base, local, attrs), _in_config_terms(dim, local, attrs)
                return (theta, dims) if theta and dims else None
    return None


def _substitute(e: cst.BaseExpression, values: dict) -> cst.BaseExpression:
    """E with each name of VALUES replaced by its value (parenthesised where it is an operation)."""
    if isinstance(e, cst.Name):
        return values.get(e.value, e)

    class _Sub(cst.CSTTransformer):
        def leave_Name(self, original, updated):
            v = values.get(updated.value)
            if v is None:
                return updated
            return v.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()]) \
                if isinstance(v, cst.BinaryOperation) and not v.lpar else v

    return e.visit(_Sub())  # type: ignore[return-value]


def _inv_attr(init: cst.FunctionDef) -> str | None:
    """The attribute __init__ assigns its inverse frequencies to (`self.inv_freq = 1.0 / (base ** ...)`)."""
    for node in findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))])):
        if findall(node.value, _POWER):  # type: ignore[attr-defined]
            return code(node.targets[0].target)  # type: ignore[attr-defined]
    return None


def _reads(e: cst.CSTNode) -> set[str]:
    """Local names and `self.X` attributes E reads."""
    return names_in(e) | {code(a) for a in findall(e, m.Attribute(value=m.Name("self")))}


def _taints(methods: dict[str, cst.FunctionDef], name: str, param: str, target: str,
            seen: set[tuple[str, str]]) -> bool:
    """PARAM of method NAME reaches an assignment of TARGET (through locals, attributes of self,
    and the class's own methods it is handed to)."""
    if (name, param) in seen or name not in methods:
        return False
    seen.add((name, param))
    fn = methods[name]
    tainted = {param}
    for _ in range(2):  # assignments in loops or arms read in any order
        for node in findall(fn, m.Assign()):
            if _reads(node.value) & tainted:  # type: ignore[attr-defined]
                for t in node.targets:  # type: ignore[attr-defined]
                    if code(t.target) == target:
                        return True
                    tainted |= set(names_in(t.target)) if isinstance(t.target, cst.Name) else {code(t.target)}
    for call in findall(fn, m.Call(func=m.Attribute(value=m.Name("self")))):
        callee = call.func.attr.value  # type: ignore[attr-defined]
        params = [p.name.value for p in methods[callee].params.params][1:] if callee in methods else []
        for i, a in enumerate(call.args):  # type: ignore[attr-defined]
            if not (_reads(a.value) & tainted):
                continue
            p = a.keyword.value if a.keyword is not None else (params[i] if i < len(params) else None)
            if p is not None and _taints(methods, callee, p, target, seen):
                return True
    return False


def value_arguments(idx: ModelIndex, rotary_classes: list[str]) -> list[tuple[cst.Call, str, str, str]]:
    """Calls of a rotary module that hand it something its inverse frequencies are computed from
    (Qwen-1's `self.rotary_emb(n, ntk_alpha=ntk_alpha)`, whose forward raises the base by it), other
    than that parameter's own default: (call, owner class, rotary class, parameter). The engine's
    rotary computes the frequencies from the base and dims alone."""
    out = []
    for cls in rotary_classes:
        info = idx.classes.get(cls)
        init, fwd = (info.method("__init__"), info.method("forward")) if info else (None, None)
        target = _inv_attr(init) if init is not None else None
        if target is None or fwd is None:
            continue
        methods = {f.name.value: f for f in info.node.body.body if isinstance(f, cst.FunctionDef)}  # type: ignore[union-attr]
        params = fwd.params.params[1:]
        for owner in idx.classes.values():
            attrs = [a for a, sub in owner.submodules.items() if sub.ctor == cls]
            for call in findall(owner.node, m.Call(func=m.Attribute(value=m.Name("self")))):
                if call.func.attr.value not in attrs:  # type: ignore[attr-defined]
                    continue
                for i, a in enumerate(call.args):  # type: ignore[attr-defined]
                    p = next((x for x in params if a.keyword is not None and x.name.value == a.keyword.value),
                             params[i] if a.keyword is None and i < len(params) else None)
                    if p is None:
                        continue
                    default = p.default
                    if default is not None and isinstance(a.value, (cst.Integer, cst.Float)) and \
                            isinstance(default, (cst.Integer, cst.Float)) and \
                            float(a.value.value) == float(default.value):
                        continue  # the default itself (PT300 leaves the literal 1 where it showed the factor is 1)
                    if _taints(methods, "forward", p.name.value, target, set()):
                        out.append((call, owner.name, cls, p.name.value))
    return out
