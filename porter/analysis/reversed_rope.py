"""Rotary that turns the other way, and whether a sign folded into q/k keeps it exact.

The engine's get_rope rotates each pair of halves (x1, x2) by +theta: `x * cos + cat(-x2, x1) *
sin`. A `rotate_half` returning `cat(x2, -x1)` (NanoChat) rotates by -theta. With N the sign flip
of each head's second half, R(-theta) = N R(theta) N: negating that half of the q and k
projections when loading gives the engine's rotation N q_rot instead of HF's q_rot, and N cancels
in q . k as long as what lies between the rotation and the attention treats every element alike
up to its sign (an RMS norm over the head: x^2 and the elementwise weight commute with N).
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, findall, names_in, self_attr
from porter.analysis.index import ClassInfo, ModelIndex


def turns_back(rot: cst.FunctionDef | None) -> cst.Call | None:
    """The `torch.cat((x2, -x1), ...)` of a rotate_half that turns the other way, else None."""
    for cat in findall(rot, m.Call(func=m.Attribute(attr=m.Name("cat")), args=[
            m.Arg(value=m.Tuple(elements=[m.Element(), m.Element()])), m.ZeroOrMore()])) if rot else []:
        first, second = (e.value for e in cat.args[0].value.elements)  # type: ignore[attr-defined]
        if m.matches(second, m.UnaryOperation(operator=m.Minus())) and not m.matches(
                first, m.UnaryOperation(operator=m.Minus())):
            return cat  # type: ignore[return-value]
    return None


def _rms_norm_class(info: ClassInfo | None) -> bool:
    """A norm by the root mean square, not mean-centred (the whole class: its helpers too)."""
    if info is None:
        return False
    text = code(info.node)
    return "rsqrt" in text and "pow(2)" in text and "mean" in text and not findall(
        info.node, m.BinaryOperation(operator=m.Subtract()))


def sign_cancels(idx: ModelIndex, info: ClassInfo, helper: str, attention_calls: set[str],
                 hf_names: frozenset[str]) -> bool:
    """Between the rotary call and the attention call, q and k pass only through RMS norms
    (`q = self.q_norm(q)`) and HF plumbing; nothing else reads them."""
    fwd = info.method("forward")
    if fwd is None:
        return False
    body = list(fwd.body.body)
    start = next((i for i, st in enumerate(body) if findall(st, m.Call(func=m.Name(helper)))), None)
    if start is None or not m.matches(body[start], m.SimpleStatementLine(body=[m.Assign(
            targets=[m.AssignTarget(m.Tuple(elements=[m.Element(m.Name()), m.Element(m.Name())]))])])):
        return False
    rotated = {e.value.value for e in body[start].body[0].targets[0].target.elements}  # type: ignore[attr-defined]
    for st in body[start + 1:]:
        if findall(st, m.Call(func=m.Name(m.MatchIfTrue(lambda n: n in attention_calls)))):
            return True
        if isinstance(st, cst.If) and names_in(st.test) & hf_names:
            continue  # the HF cache update, dropped with the plumbing
        if not names_in(st) & rotated:
            continue
        norm = m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())], value=m.Call(
            func=m.Attribute(value=m.Name("self")), args=[m.Arg(m.Name())]))])
        if not m.matches(st, norm):
            return False
        assign = st.body[0]  # type: ignore[attr-defined]
        if assign.targets[0].target.value != assign.value.args[0].value.value:
            return False
        sub = info.submodules.get(self_attr(assign.value.func) or "")
        if sub is None or not _rms_norm_class(idx.classes.get(sub.ctor)):
            return False
    return False
