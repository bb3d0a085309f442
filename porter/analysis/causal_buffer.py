"""Causal-mask buffers an attention module builds in `__init__` and what they let through.

GPT-Neo and older GPT-2-style attentions keep a boolean lower-triangular buffer
(`torch.tril(torch.ones(n, n))`) and mask the scores with `torch.where(self.bias[...], w, min)`.
The engine's Attention is causal, so a plain triangle adds nothing. A band (GPT-Neo's local
layers: `bias ^ torch.tril(bias, -W)`, built under `if attention_type == "local":`) lets a token
see itself and the W-1 before it: the engine's sliding window of W for those layers.
Read statically from the class's `__init__`; anything else is unknown (None)."""

from __future__ import annotations

import dataclasses

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, dotted, findall, find_method, self_attr

_SHAPE_METHODS = {"view", "reshape", "to", "bool", "contiguous", "unsqueeze", "expand"}


@dataclasses.dataclass(frozen=True)
class CausalBuffer:
    """A lower-triangular mask buffer; `window` the sliding window it bands to (an expression over
    `self`, possibly conditional: `self.config.window_size if self.attention_type == "local" else None`)."""

    attr: str
    window: str | None = None


def _strip_shape(e: cst.BaseExpression) -> cst.BaseExpression:
    """`torch.tril(x).view(1, 1, n, n)` -> `torch.tril(x)`: methods that only reshape or cast."""
    while isinstance(e, cst.Call) and isinstance(e.func, cst.Attribute) and e.func.attr.value in _SHAPE_METHODS \
            and dotted(e.func.value) not in ("torch", "nn"):
        e = e.func.value
    return e


def _is_tril(e: cst.BaseExpression) -> bool:
    """`torch.tril(torch.ones(...))` (diagonal 0): the causal triangle."""
    e = _strip_shape(e)
    if not (isinstance(e, cst.Call) and dotted(e.func) in ("torch.tril", "tril")) or not e.args:
        return False
    extra = [a for a in e.args[1:]]
    if extra and not all(m.matches(a.value, m.Integer("0")) for a in extra):
        return False
    ones = _strip_shape(e.args[0].value)
    return isinstance(ones, cst.Call) and dotted(ones.func) in ("torch.ones", "ones")


def _band(e: cst.BaseExpression, name: str) -> cst.BaseExpression | None:
    """`torch.bitwise_xor(name, torch.tril(name, -W))` (or `name ^ torch.tril(name, -W)`) -> W."""
    e = _strip_shape(e)
    if isinstance(e, cst.Call) and dotted(e.func) in ("torch.bitwise_xor", "torch.logical_xor") and len(e.args) == 2:
        a, b = e.args[0].value, e.args[1].value
    elif isinstance(e, cst.BinaryOperation) and isinstance(e.operator, cst.BitXor):
        a, b = e.left, e.right
    else:
        return None
    if not m.matches(a, m.Name(name)):
        a, b = b, a
    if not (m.matches(a, m.Name(name)) and isinstance(b, cst.Call) and dotted(b.func) in ("torch.tril", "tril")
            and len(b.args) == 2 and m.matches(b.args[0].value, m.Name(name))):
        return None
    diag = b.args[1].value
    if isinstance(diag, cst.UnaryOperation) and isinstance(diag.operator, cst.Minus):
        return diag.expression
    return None


class _ToSelf(cst.CSTTransformer):
    """`__init__`'s locals -> the `self.` attributes it stores them in; None when one is not stored."""

    def __init__(self, stored: dict[str, str]) -> None:
        super().__init__()
        self.stored = stored
        self.missing = False
        self.attrs: set[int] = set()

    def visit_Attribute(self, node):
        self.attrs.add(id(node.attr))
        return True

    def leave_Name(self, original, updated):
        if id(original) in self.attrs or updated.value in ("self", "None", "True", "False"):
            return updated
        if updated.value not in self.stored:
            self.missing = True
            return updated
        return cst.Attribute(value=cst.Name("self"), attr=cst.Name(self.stored[updated.value]))


def _to_self(e: cst.BaseExpression, stored: dict[str, str]) -> str | None:
    t = _ToSelf(stored)
    out = e.visit(t)
    return None if t.missing else code(out)


def causal_buffers(cls: cst.ClassDef) -> dict[str, CausalBuffer | None]:
    """The buffers `__init__` registers, by attribute: a CausalBuffer, or None when not a (banded) triangle."""
    init = find_method(cls, "__init__")
    if init is None:
        return {}
    stored: dict[str, str] = {}
    for a in findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))], value=m.Name())):
        stored.setdefault(a.value.value, a.targets[0].target.attr.value)  # type: ignore[attr-defined]
    out: dict[str, CausalBuffer | None] = {}
    for attr, value in _registered(init):
        out[attr] = _classify(init, attr, value, stored)
    return out


def _registered(init: cst.FunctionDef) -> list[tuple[str, cst.BaseExpression]]:
    found: list[tuple[str, cst.BaseExpression]] = []
    for a in findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))], value=m.Call())):
        call = a.value  # type: ignore[attr-defined]
        if (dotted(call.func) or "").endswith("Buffer") and call.args:
            found.append((a.targets[0].target.attr.value, call.args[0].value))  # type: ignore[attr-defined]
    for call in findall(init, m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name("register_buffer")))):
        args = call.args  # type: ignore[attr-defined]
        if len(args) >= 2 and isinstance(args[0].value, cst.SimpleString):
            found.append((args[0].value.evaluated_value, args[1].value))
    return found


def _classify(init: cst.FunctionDef, attr: str, value: cst.BaseExpression,
              stored: dict[str, str]) -> CausalBuffer | None:
    if _is_tril(value):
        return CausalBuffer(attr)
    if not isinstance(value, cst.Name):
        return None
    name = value.value
    steps: list[tuple[cst.BaseExpression, cst.BaseExpression | None]] = []  # (value, condition)
    for st in init.body.body:
        cond = None
        body = [st]
        if isinstance(st, cst.If) and st.orelse is None:
            cond, body = st.test, list(st.body.body)
        for s in body:
            for a in findall(s, m.Assign(targets=[m.AssignTarget(m.Name(name))])):
                steps.append((a.value, cond))  # type: ignore[attr-defined]
    if not steps or steps[0][1] is not None or not _is_tril(steps[0][0]):
        return None
    window = None
    for e, cond in steps[1:]:
        w = _band(e, name)
        if w is None or window is not None:
            return None
        w_self = _to_self(w, stored)
        c_self = _to_self(cond, stored) if cond is not None else None
        if w_self is None or (cond is not None and c_self is None):
            return None
        window = w_self if cond is None else f"{w_self} if {c_self} else None"
    return CausalBuffer(attr, window)


def mask_fill(e: cst.BaseExpression) -> bool:
    """What masked scores are set to: the dtype's lowest value or a large negative literal."""
    if findall(e, m.Attribute(value=m.Call(func=m.Attribute(attr=m.Name("finfo"))), attr=m.Name("min"))):
        return True
    if isinstance(e, cst.UnaryOperation) and isinstance(e.operator, cst.Minus) and isinstance(e.expression, (cst.Integer, cst.Float)):
        return float(e.expression.value) >= 1e4
    return m.matches(e, m.Call(func=m.Name("float"), args=[m.Arg(m.SimpleString(m.MatchIfTrue(lambda s: s.strip("'\"") == "-inf")))]))


def buffer_of(e: cst.BaseExpression) -> str | None:
    """`self.bias[:, :, a:b, :b]` -> "bias"."""
    while isinstance(e, cst.Subscript):
        e = e.value
    return self_attr(e)
