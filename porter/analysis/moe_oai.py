"""Experts of the engine's `swigluoai` activation, recognised by dataflow (gpt_oss).

The experts hold a packed gate/up weight with a bias and a down weight with a bias, stored
(experts, in, out) and applied per expert as `x @ W[e] + b[e]`. Between the two products one
method of the class computes the clamped SwiGLU over *interleaved* gate/up columns:

    gate, up = x[..., ::2], x[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    glu = gate * torch.sigmoid(gate * alpha)
    return (up + 1) * glu

which is, statement for statement, the engine's `swigluoai` (its CPU kernel's constants are
alpha 1.702 and limit 7.0: the port checks the configuration's values against them). Anything else
is not read here (porter never approximates the experts).
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, findall, self_attr, self_call_attr

# the engine's swigluoai, local names canonical (x: the input; t0, t1, ...: its locals in order)
_SWIGLUOAI = (
    "t0, t1 = x[..., ::2], x[..., 1::2]\n"
    "t0 = t0.clamp(min=None, max={limit})\n"
    "t1 = t1.clamp(min=-{limit}, max={limit})\n"
    "t2 = t0 * torch.sigmoid(t0 * {alpha})\n"
    "t3 = (t1 + 1) * t2\n"
    "return t3\n"
)
_SELF_PRODUCT = m.BinaryOperation(operator=m.MatrixMultiply(), right=m.Subscript(value=m.Attribute(value=m.Name("self"))))
_BIASED = m.BinaryOperation(operator=m.Add(), left=_SELF_PRODUCT, right=m.Subscript(value=m.Attribute(value=m.Name("self"))))


class _Canon(cst.CSTTransformer):
    def __init__(self, names: dict[str, str]) -> None:
        super().__init__()
        self.names = names

    def leave_Name(self, original, updated):
        return updated.with_changes(value=self.names.get(updated.value, updated.value))


def _canonical(fn: cst.FunctionDef) -> str | None:
    """The method's body with its parameter named `x` and its locals `t0, t1, ...` (first assigned first)."""
    params = [p.name.value for p in fn.params.params]
    if len(params) != 2 or params[0] != "self" or not isinstance(fn.body, cst.IndentedBlock):
        return None
    names = {params[1]: "x"}
    for st in fn.body.body:
        for a in findall(st, m.AssignTarget()):
            targets = a.target.elements if isinstance(a.target, cst.Tuple) else [a]  # type: ignore[attr-defined]
            for t in targets:
                t = t.value if isinstance(t, cst.Element) else t.target
                if isinstance(t, cst.Name) and t.value not in names:
                    names[t.value] = f"t{len(names) - 1}"
    body = cst.Module(body=list(fn.body.body)).visit(_Canon(names))
    return cst.Module(body=[]).code_for_node(body) if isinstance(body, cst.Module) else None


def _constants(fn: cst.FunctionDef) -> tuple[str, str] | None:
    """(alpha, limit) as written: the `max=` of the first clamp, the factor inside the sigmoid."""
    clamps = findall(fn, m.Call(func=m.Attribute(attr=m.Name("clamp"))))
    sig = findall(fn, m.Call(func=m.Attribute(attr=m.Name("sigmoid")), args=[m.Arg(m.BinaryOperation(operator=m.Multiply()))]))
    if not clamps or len(sig) != 1:
        return None
    limit = next((a.value for a in clamps[0].args if a.keyword and a.keyword.value == "max"), None)  # type: ignore[attr-defined]
    if limit is None:
        return None
    return code(sig[0].args[0].value.right), code(limit)  # type: ignore[attr-defined]


def swigluoai_experts(info, three_d: dict, two_d: dict) -> dict | None:
    """What the experts module of a `swigluoai` MoE holds, or None: gate_up / down (3-D), their
    biases (2-D), the intermediate size, and the activation's alpha and limit (as written)."""
    fwd = info.method("forward")
    if fwd is None or len(three_d) != 2 or len(two_d) != 2:
        return None
    biased = {}  # local -> (weight, bias) of `x @ self.w[e] + self.b[e]`
    for a in findall(fwd, m.Assign(targets=[m.AssignTarget(m.Name())], value=_BIASED)):
        w, b = self_attr(a.value.left.right.value), self_attr(a.value.right.value)  # type: ignore[attr-defined]
        if w in three_d and b in two_d:
            biased[a.targets[0].target.value] = (w, b, a.value.left.left)  # type: ignore[attr-defined]
    if len(biased) != 2:
        return None
    # the activation: one method of the class applied to the first product, its result the second's input
    acts = [a for a in findall(fwd, m.Assign(targets=[m.AssignTarget(m.Name())], value=m.Call(args=[m.Arg(m.Name())])))
            if self_call_attr(a.value) is not None and a.value.args[0].value.value in biased]  # type: ignore[attr-defined]
    if len(acts) != 1:
        return None
    act_out = acts[0].targets[0].target.value  # type: ignore[attr-defined]
    gate_up, gu_bias, _ = biased[acts[0].value.args[0].value.value]  # type: ignore[attr-defined]
    down_local = [k for k, (w, _, x) in biased.items() if w != gate_up and m.matches(x, m.Name(act_out))]
    if len(down_local) != 1:
        return None
    down, down_bias, _ = biased[down_local[0]]
    method = info.method(self_call_attr(acts[0].value))  # type: ignore[arg-type]
    consts = _constants(method) if method is not None else None
    if method is None or consts is None or _canonical(method) != _SWIGLUOAI.format(alpha=consts[0], limit=consts[1]):
        return None
    alpha, limit = (cst.parse_expression(c) for c in consts)
    # (experts, in, out): the down weight's middle dimension is the intermediate size
    return {"gate_up": gate_up, "down": down, "bias": [gu_bias, down_bias], "intermediate": three_d[down][1],
            "act": cst.SimpleString('"swigluoai"'), "transposed": True, "swiglu": [alpha, limit]}
