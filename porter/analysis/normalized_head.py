"""A head module whose logits are `linear(h, W / ||W||)`: each vocabulary row of its one weight
scaled to unit length before the product (Baichuan2's `NormHead`).

HF computes the normalised weight in forward, in arms of its own: every call while training, and
in inference once, on the first call, writing it back into the parameter (`self.weight.data =
normalize(self.weight)`), after which a flag set false in that same arm sends later calls to the
arm that reads the parameter as it is. Whatever arm runs in inference, the product is with the
row-normalised checkpoint weight (normalising twice changes nothing). The engine's head is a plain
`ParallelLMHead`: the port normalises the rows once when loading the checkpoint, before the
vocabulary is split across ranks (each row is whole on one rank). A head whose arms read the weight
any other way is not recognised (it stays a class of the file, and what no rule maps is refused).
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, dotted, findall, self_attr
from porter.analysis.index import ClassInfo

_NORMALIZE = {"normalize", "F.normalize", "nn.functional.normalize", "torch.nn.functional.normalize",
              "functional.normalize"}
_LINEAR = {"F.linear", "nn.functional.linear", "torch.nn.functional.linear", "functional.linear"}


def _row_normalized(value: cst.BaseExpression) -> bool:
    """`normalize(self.weight)` (p=2 over dim 1, the defaults, or said so)."""
    if not isinstance(value, cst.Call) or dotted(value.func) not in _NORMALIZE:
        return False
    pos = [a.value for a in value.args if a.keyword is None]
    kw = {a.keyword.value: a.value for a in value.args if a.keyword is not None}
    if len(pos) < 1 or code(pos[0]) != "self.weight":
        return False
    p = pos[1] if len(pos) > 1 else kw.get("p")
    dim = pos[2] if len(pos) > 2 else kw.get("dim")
    return (p is None or code(p) in ("2", "2.0")) and (dim is None or code(dim) in ("1", "-1")) and len(pos) <= 3


def _arms(st: cst.If) -> list[tuple[cst.BaseExpression | None, cst.BaseSuite]]:
    out: list[tuple[cst.BaseExpression | None, cst.BaseSuite]] = [(st.test, st.body)]
    orelse = st.orelse
    while orelse is not None:
        if isinstance(orelse, cst.If):
            out.append((orelse.test, orelse.body))
            orelse = orelse.orelse
        else:
            out.append((None, orelse.body))
            orelse = None
    return out


def _writes_weight(node: cst.CSTNode) -> list[cst.BaseExpression]:
    found = findall(node, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self"), attr=m.Name("weight"))
                                                            | m.Attribute(value=m.Attribute(
                                                                value=m.Name("self"), attr=m.Name("weight")),
                                                                attr=m.Name("data")))]))
    return [a.value for a in found]  # type: ignore[attr-defined]


def normalized_head(info: ClassInfo) -> bool:
    """The class computes `linear(h, normalize(self.weight))` in inference (module docstring)."""
    fwd, init = info.method("forward"), info.method("__init__")
    if fwd is None or init is None or _declared_shape(init) is None:
        return False
    body = [st for st in fwd.body.body if not m.matches(st, m.SimpleStatementLine(body=[m.Expr(m.SimpleString())]))]
    if len(body) != 2 or not isinstance(body[0], cst.If) or not m.matches(body[1], m.SimpleStatementLine(
            body=[m.Return(m.Call(args=[m.Arg(keyword=None), m.Arg(value=m.Name(), keyword=None)]))])):
        return False
    ret = body[1].body[0].value  # type: ignore[attr-defined]
    if dotted(ret.func) not in _LINEAR:
        return False
    w = ret.args[1].value.value
    # the parameter is declared in __init__; every later write of it normalises it
    declared = {id(v) for v in _writes_weight(init)}
    if not all(_row_normalized(v) for v in _writes_weight(info.node) if id(v) not in declared):
        return False
    # flags whose only false assignment sits in an arm that normalises the parameter in place
    flags_ok: set[str] = set()
    arms = _arms(body[0])
    for test, suite in arms:
        if test is not None and self_attr(test) and _writes_weight(suite):
            flag = self_attr(test)
            sets = findall(info.node, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self"),
                                                                                   attr=m.Name(flag)))]))
            falses = [a for a in sets if not m.matches(a.value, m.Name("True"))]  # type: ignore[attr-defined]
            in_arm = {id(a) for a in findall(suite, m.Assign())}
            in_init = {id(a) for a in findall(init, m.Assign())}
            if all(id(a) in in_arm for a in falses) and any(id(a) in in_init and m.matches(a.value, m.Name("True"))
                                                            for a in sets):  # type: ignore[attr-defined]
                flags_ok.add(flag)
    seen_tests: list[str] = []
    for test, suite in arms:
        if test is not None and m.matches(test, m.Attribute(value=m.Name("self"), attr=m.Name("training"))):
            seen_tests.append("training")
            continue  # training only
        binds = [a.value for a in findall(suite, m.Assign(targets=[m.AssignTarget(m.Name(w))]))]  # type: ignore[attr-defined]
        if not binds:
            return False
        last = binds[-1]
        if _row_normalized(last):
            pass
        elif code(last) == "self.weight":
            # normalised in place in this arm, or only reached once a checked flag went false
            if not _writes_weight(suite) and not (test is None and set(seen_tests) - {"training"} <= flags_ok
                                                  and set(seen_tests) & flags_ok):
                return False
        else:
            return False
        if test is not None:
            seen_tests.append(self_attr(test) or code(test))
    return True


def _declared_shape(init: cst.FunctionDef) -> tuple[str, str] | None:
    """`self.weight = nn.Parameter(torch.empty((rows, cols)))`: the two parameter names, rows first."""
    for v in _writes_weight(init):
        for c in findall(v, m.Call(func=m.Attribute(value=m.Name("torch")))):
            dims = [a.value for a in c.args if a.keyword is None]  # type: ignore[attr-defined]
            if len(dims) == 1 and isinstance(dims[0], (cst.Tuple, cst.List)):
                dims = [e.value for e in dims[0].elements]
            if len(dims) == 2 and all(isinstance(d, cst.Name) for d in dims):
                return dims[0].value, dims[1].value  # type: ignore[attr-defined]
    return None


def head_sizes(info: ClassInfo, call: cst.Call) -> tuple[str, str] | None:
    """(in_features, out_features) as source text: what the call gives the head's weight shape
    (`[vocab, hidden]`: rows are the vocabulary), bound by the head's own parameter names."""
    init = info.method("__init__")
    shape = _declared_shape(init) if init is not None else None
    if shape is None:
        return None
    params = [p.name.value for p in init.params.params][1:]  # type: ignore[union-attr]
    pos = [a.value for a in call.args if a.keyword is None]
    kw = {a.keyword.value: a.value for a in call.args if a.keyword is not None}
    bound = {p: (pos[i] if i < len(pos) else kw.get(p)) for i, p in enumerate(params)}
    rows, cols = bound.get(shape[0]), bound.get(shape[1])
    if rows is None or cols is None:
        return None
    return code(cols), code(rows)
