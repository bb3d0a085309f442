"""Values taken from the key projection, found by dataflow (gemma4's `attention_k_eq_v` layers):
the value projection is built only where a test of the layer holds, `None` elsewhere,

    self.v_proj = nn.Linear(...) if not self.use_alternative_attention else None

and forward falls back to the keys' projection where it is absent,

    v = self.v_proj(x).view(shape) if self.v_proj is not None else k   # k = self.k_proj(x).view(shape)

so the attention's value argument flows from both projections. In the engine's fused `qkv_proj`
such a layer's v rows hold the k projection's weights (loaded twice), so v = k's projection exactly."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, findall, self_attr


def _absent_when(build: cst.BaseExpression) -> str | None:
    """`A if T else None` -> "not (T)"; `None if T else A` -> "T"."""
    if isinstance(build, cst.IfExp):
        if m.matches(build.orelse, m.Name("None")):
            t = build.test
            return code(t.expression) if m.matches(t, m.UnaryOperation(operator=m.Not())) else f"not ({code(t)})"  # type: ignore[attr-defined]
        if m.matches(build.body, m.Name("None")):
            return code(build.test)
    return None


def value_from_key(init: cst.FunctionDef, fwd: cst.FunctionDef, k: str, v: str) -> str | None:
    """The test under which the layer builds no `self.V` and forward uses K's projection instead,
    or None when V's value does not fall back to K's that way."""
    builds = [a.value for a in findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(
        value=m.Name("self"), attr=m.Name(v)))]))]
    absent = _absent_when(builds[0]) if len(builds) == 1 else None
    if absent is None:
        return None
    tested = m.Comparison(left=m.Attribute(value=m.Name("self"), attr=m.Name(v)))
    for pick in findall(fwd, m.IfExp(test=tested)):
        assert isinstance(pick, cst.IfExp)
        if not any(self_attr(c.func.value) == v or code(c.func) == f"self.{v}"  # type: ignore[attr-defined]
                   for c in findall(pick.body, m.Call())):
            continue
        if isinstance(pick.orelse, cst.Name) and _bound_from(fwd, pick.orelse.value, k):
            return absent
    return None


def _bound_from(fwd: cst.FunctionDef, name: str, k: str) -> bool:
    """NAME is bound from `self.K(...)` (its projection, maybe viewed) somewhere in forward."""
    for a in findall(fwd, m.Assign(targets=[m.AssignTarget(m.Name(name))])):
        if any(code(c.func) == f"self.{k}" for c in findall(a.value, m.Call())):  # type: ignore[attr-defined]
            return True
    return False
