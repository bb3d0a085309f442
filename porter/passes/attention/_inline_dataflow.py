"""The dataflow the inline-eager-attention rule (PT150) reads: single-name assignments, what a
statement writes and reads, the score matmul in its spellings, the tensors an expression computes from."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, dotted, findall, names_in

SOFTMAX = m.Call(func=m.Attribute(attr=m.Name("softmax")) | m.Name("softmax")
                 | m.Call(func=m.Attribute(attr=m.Name("Softmax")) | m.Name("Softmax")))  # nn.Softmax(dim=-1)(w)


_MODULES = {"torch", "F", "nn", "math"}
_MATMUL_FUNCS = {"torch.matmul", "torch.bmm", "matmul", "bmm"}
_BADDBMM_FUNCS = {"torch.baddbmm", "baddbmm"}


def _simple_assign(st: cst.CSTNode) -> cst.Assign | cst.AugAssign | None:
    if isinstance(st, cst.SimpleStatementLine) and len(st.body) == 1 \
            and isinstance(st.body[0], (cst.Assign, cst.AugAssign)):
        small = st.body[0]
        target = small.targets[0].target if isinstance(small, cst.Assign) and len(small.targets) == 1 \
            else getattr(small, "target", None)
        if isinstance(target, cst.Name):
            return small
    return None


def _raise_check(st: cst.CSTNode) -> bool:
    """`if w.size() != (b, h, n, m): raise ValueError(...)`: a check that computes nothing."""
    return isinstance(st, cst.If) and st.orelse is None and all(
        m.matches(x, m.SimpleStatementLine(body=[m.Raise()])) for x in st.body.body)


def _target(small: cst.Assign | cst.AugAssign) -> str:
    t = small.targets[0].target if isinstance(small, cst.Assign) else small.target
    return t.value  # type: ignore[union-attr]


def _writes(st: cst.CSTNode) -> set[str]:
    out: set[str] = set()
    for a in findall(st, m.Assign() | m.AugAssign()):
        targets = [t.target for t in a.targets] if isinstance(a, cst.Assign) else [a.target]  # type: ignore[attr-defined]
        for t in targets:
            out |= names_in(t) if isinstance(t, (cst.Tuple, cst.List)) else ({t.value} if isinstance(t, cst.Name) else set())
    return out


def _reads(small: cst.Assign | cst.AugAssign) -> set[str]:
    out = names_in(small.value)
    if isinstance(small, cst.AugAssign):
        out.add(_target(small))
    return out


def _matmul(value: cst.BaseExpression) -> tuple[cst.BaseExpression, cst.BaseExpression, cst.Call | None] | None:
    """(a, b, baddbmm-call) of `a @ b`, `torch.matmul(a, b)`, `torch.bmm(a, b)`, `bias.baddbmm(batch1=a, batch2=b)`,
    `torch.baddbmm(bias, a, b)` found in the expression (the outermost one)."""
    for node in findall(value, m.BinaryOperation(operator=m.MatrixMultiply()) | m.Call()):
        if isinstance(node, cst.BinaryOperation):
            return node.left, node.right, None
        name = dotted(node.func)  # type: ignore[attr-defined]
        args = node.args  # type: ignore[attr-defined]
        pos = [a.value for a in args if a.keyword is None]
        kw = {a.keyword.value: a.value for a in args if a.keyword is not None}
        if name in _MATMUL_FUNCS and len(pos) == 2:
            return pos[0], pos[1], None
        if name in _BADDBMM_FUNCS:  # torch.baddbmm(input, batch1, batch2, beta=, alpha=)
            ops = dict(zip(("input", "batch1", "batch2"), pos)) | kw
            if "batch1" in ops and "batch2" in ops:
                return ops["batch1"], ops["batch2"], node  # type: ignore[return-value]
        elif isinstance(node.func, cst.Attribute) and node.func.attr.value == "baddbmm" \
                and "batch1" in kw and "batch2" in kw:  # type: ignore[attr-defined]
            return kw["batch1"], kw["batch2"], node  # type: ignore[return-value]
    return None


def baddbmm_input(call: cst.Call) -> cst.BaseExpression | None:
    """What a baddbmm adds its product to: `input` of `torch.baddbmm(input, b1, b2)`, the object of
    `input.baddbmm(batch1=, batch2=)`."""
    if dotted(call.func) in _BADDBMM_FUNCS:
        pos = [a.value for a in call.args if a.keyword is None]
        kw = {a.keyword.value: a.value for a in call.args if a.keyword is not None}
        return pos[0] if pos else kw.get("input")
    return call.func.value if isinstance(call.func, cst.Attribute) else None


_ZEROS = m.Call(func=m.Attribute(value=m.Name("torch"), attr=m.Name("zeros") | m.Name("zeros_like"))
                | m.Attribute(attr=m.Name("new_zeros")))


def adds_nothing(call: cst.Call, bound: dict[str, cst.BaseExpression | None]) -> bool:
    """The baddbmm's `beta * input` is 0: `beta=0`, or an input that is a tensor of zeros (built by
    `torch.zeros`/`zeros_like`/`new_zeros`, directly or through the one local name bound to it;
    `bound` maps a name bound once in the block to its value, None when bound more than once)."""
    beta = next((a.value for a in call.args if a.keyword is not None and a.keyword.value == "beta"), None)
    if beta is not None and m.matches(beta, m.Integer("0") | m.Float(m.MatchIfTrue(lambda v: float(v) == 0.0))):
        return True
    base = baddbmm_input(call)
    if isinstance(base, cst.Name):
        base = bound.get(base.value)
    return base is not None and m.matches(base, _ZEROS)


def _root(e: cst.BaseExpression) -> str | None:
    """`key.transpose(-1, -2)` -> "key": the name a chain of method calls / attributes starts from."""
    while True:
        if isinstance(e, cst.Name):
            return e.value
        if isinstance(e, cst.Call) and isinstance(e.func, cst.Attribute):
            e = e.func.value
        elif isinstance(e, cst.Attribute):
            e = e.value
        elif isinstance(e, cst.Subscript):
            e = e.value
        else:
            return None


def _tensor_roots(e: cst.BaseExpression) -> set[str]:
    """The tensors an expression computes from: both sides of an operator, the object a method chain
    starts from (`w.view(b, h, n, -1)` -> {"w"}; the arguments are sizes)."""
    if isinstance(e, cst.BinaryOperation):
        return _tensor_roots(e.left) | _tensor_roots(e.right)
    if isinstance(e, cst.Call) and (not isinstance(e.func, cst.Attribute) or (dotted(e.func) or "").split(".")[0] in _MODULES):
        out: set[str] = set()
        for a in e.args:
            out |= _tensor_roots(a.value)
        return out
    root = _root(e)
    if root in _MODULES:  # a method chain on a torch function's result (`torch.full([], x).to(d)`): its tensors
        inner = e
        while isinstance(inner, (cst.Call, cst.Attribute, cst.Subscript)):
            if isinstance(inner, cst.Call) and (dotted(inner.func) or "").split(".")[0] in _MODULES:
                return _tensor_roots(inner)
            inner = inner.func if isinstance(inner, cst.Call) else inner.value
    return {root} if root else set()


def _mul(a: str | None, b: str) -> str:
    return b if a is None else f"{a} * {b}"


def _blend(value: cst.BaseExpression) -> tuple[cst.BaseExpression, cst.BaseExpression] | None:
    """`w * b + fill * (1 - b)` (either order of each sum and product): the scores kept where b is 1,
    `fill` where it is 0. Returns (b, fill)."""
    if not m.matches(value, m.BinaryOperation(operator=m.Add(), left=m.BinaryOperation(operator=m.Multiply()),
                                              right=m.BinaryOperation(operator=m.Multiply()))):
        return None
    for keep, other in ((value.left, value.right), (value.right, value.left)):  # type: ignore[attr-defined]
        for fill, inv in ((other.left, other.right), (other.right, other.left)):
            if not m.matches(inv, m.BinaryOperation(operator=m.Subtract(), left=m.Integer("1") | m.Float("1.0"))):
                continue
            b = inv.right
            if code(keep.left) == code(b) or code(keep.right) == code(b):
                return b, fill
    return None


def _bound_once(body: list[cst.BaseStatement]) -> dict[str, cst.BaseExpression | None]:
    """Each local name the statements bind: its value when one single-name assignment binds it,
    None when it is bound more than once (or some other way)."""
    out: dict[str, cst.BaseExpression | None] = {}
    for st in body:
        small = _simple_assign(st)
        for name in _writes(st):
            single = small is not None and isinstance(small, cst.Assign) and _target(small) == name
            out[name] = small.value if single and name not in out else None  # type: ignore[union-attr]
    return out


def _query_row_slice(small: cst.BaseSmallStatement) -> str | None:
    """`m = m[:, :, -1:, :]` (any leading `:`): the name a statement rebinds to a slice of its own
    second-to-last axis (the query rows of a `[..., query, key]` mask), every other axis taken
    whole; None for anything else (a slice of the keys changes which keys are seen)."""
    if not isinstance(small, cst.Assign) or len(small.targets) != 1 or not isinstance(small.targets[0].target, cst.Name):
        return None
    name, value = small.targets[0].target.value, small.value
    if not m.matches(value, m.Subscript(value=m.Name(name))):
        return None
    idx = [e.slice for e in value.slice]  # type: ignore[attr-defined]
    whole = m.Slice(lower=None, upper=None, step=None)
    if len(idx) < 2 or not isinstance(idx[-2], cst.Slice) or not all(m.matches(e, whole) for i, e in enumerate(idx)
                                                                      if i != len(idx) - 2):
        return None
    return name


def _query_row_arm(st: cst.CSTNode) -> str | None:
    """`if q_len == 1: m = m[:, -1:, :]` (nested arms too, `else` included): an arm whose every
    statement keeps the query rows of one name (`_query_row_slice`) and nothing else; that name."""
    if not isinstance(st, cst.If):
        return None
    found: set[str | None] = set()
    blocks: list[cst.BaseSuite] = [st.body]
    orelse = st.orelse
    while orelse is not None:
        blocks.append(orelse.body)
        orelse = orelse.orelse if isinstance(orelse, cst.If) else None
    for block in blocks:
        for s in block.body:  # type: ignore[attr-defined]
            if isinstance(s, cst.If):
                found.add(_query_row_arm(s))
            elif isinstance(s, cst.SimpleStatementLine) and len(s.body) == 1:
                found.add(_query_row_slice(s.body[0]))
            else:
                return None
    return found.pop() if len(found) == 1 and None not in found else None
