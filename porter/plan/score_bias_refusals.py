"""Refusal of a learned relative-position bias added to the attention scores (rule engine-attention):
CPM-Ant adds to its scores, before the softmax, a tensor a module of the model computes once from a
learned table (`nn.Parameter`) looked up by buckets of relative positions (key position minus query
position). The engine's Attention takes no bias on the scores, so the attention written inline
cannot become it. Found by dataflow: the term added to the scores is a forward parameter, followed
up through the callers to the sub-module call that computes it, whose forward looks its table up
by an index computed from a difference of positions."""

from __future__ import annotations

from typing import TYPE_CHECKING

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import assigned_names, code, dotted, findall, loop_module, names_in, param_names, self_attr
from porter.plan.refusals import _ATTN_HEAD, Refusal

if TYPE_CHECKING:
    from porter.analysis.index import ClassInfo
    from porter.plan.model import PlanningContext as Planner

SCORE_POSITION_BIAS = Refusal(
    "a learned relative-position bias added to the attention scores (`{bias}` from {table}: an "
    "nn.Parameter table indexed by relative positions): the engine's Attention takes no score bias",
    _ATTN_HEAD + "class Bias(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.table = nn.Parameter(torch.empty(32, 4))\n\n"
    "    def forward(self, pos):\n        rel = pos[None, :] - pos[:, None]\n"
    "        return nn.functional.embedding(rel + 16, self.table).permute(2, 0, 1)\n\n\n"
    "class Attn(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.proj = nn.Linear(8, 8)\n        self.softmax = nn.Softmax(dim=-1)\n\n"
    "    def forward(self, x, bias):\n        q = self.proj(x)\n        score = q @ q.T\n"
    "        score = score + bias\n        return self.softmax(score) @ q\n\n\n"
    "class AModel(nn.Module):\n    def __init__(self, config):\n"
    "        self.embed_tokens = nn.Embedding(config.vocab_size, 8)\n        self.rel = Bias(config)\n"
    "        self.layers = nn.ModuleList([Attn(config) for _ in range(2)])\n\n"
    "    def forward(self, x, pos):\n        bias = self.rel(pos)\n"
    "        for layer in self.layers:\n            x = layer(x, bias)\n        return x\n\n\n"
    "class AForCausalLM(nn.Module):\n    def __init__(self, config):\n        self.model = AModel(config)\n"
    "        self.lm_head = nn.Linear(8, config.vocab_size)\n",
    "<example>:24: a learned relative-position bias added to the attention scores (`bias` from Bias: an "
    "nn.Parameter table indexed by relative positions): the engine's Attention takes no score bias in "
    "Attn.forward: score = score + bias (rule engine-attention)",
    rule="engine-attention", whole_file=True,
)

_SOFTMAX = m.Attribute(attr=m.Name("softmax")) | m.Name("softmax") | m.Call(
    func=m.Attribute(attr=m.Name("Softmax")) | m.Name("Softmax"))
_EMBEDDING = {"F.embedding", "nn.functional.embedding", "torch.nn.functional.embedding", "torch.embedding"}


def score_position_bias(p: Planner, classes: list[str]) -> None:
    """Refuses an attention written inline whose scores get a learned relative-position bias."""
    for name in classes:
        fwd = p.idx.classes[name].method("forward")
        for call in findall(fwd, m.Call(func=_SOFTMAX)) if fwd is not None else []:
            scores = [a.value for a in call.args if a.keyword is None][:1]  # type: ignore[attr-defined]
            if not scores or not isinstance(scores[0], cst.Name):
                continue
            for add, bias in _added_params(fwd, scores[0].value):
                table = _origin(p, classes, name, bias, set())
                if table is not None:
                    raise SCORE_POSITION_BIAS.error(p, add, f"{name}.forward: {code(add)}", bias=bias, table=table)


def _added_params(fn: cst.FunctionDef, scores: str) -> list[tuple[cst.Assign, str]]:
    """`scores = scores + P` (either order) in FN, P a parameter of FN."""
    params = set(param_names(fn))
    out = []
    for a in findall(fn, m.Assign(targets=[m.AssignTarget(m.Name(scores))], value=m.BinaryOperation(operator=m.Add()))):
        left, right = a.value.left, a.value.right  # type: ignore[attr-defined]
        for mine, other in ((left, right), (right, left)):
            if m.matches(mine, m.Name(scores)) and isinstance(other, cst.Name) and other.value in params:
                out.append((a, other.value))  # type: ignore[arg-type]
    return out


def _calls_of(info: ClassInfo, fwd: cst.FunctionDef, ctor: str) -> list[cst.Call]:
    """The calls in FWD of INFO's sub-modules built from CTOR (directly, or as a layer list's loop variable)."""
    attrs = {a for a, s in info.submodules.items() if s.ctor == ctor}
    loops = {v for loop in findall(fwd, m.For()) if (b := loop_module(loop)) and b[1] in attrs for v in [b[0]]}  # type: ignore[arg-type]
    return [c for c in findall(fwd, m.Call()) if self_attr(c.func) in attrs  # type: ignore[attr-defined]
            or (isinstance(c.func, cst.Name) and c.func.value in loops)]  # type: ignore[attr-defined]


def _origin(p: Planner, classes: list[str], cls: str, param: str, seen: set) -> str | None:
    """The class of the sub-module whose output reaches CLS.forward's PARAM, when that class looks up a
    learned table by relative positions; followed up through the callers."""
    if (cls, param) in seen:
        return None
    seen.add((cls, param))
    callee = p.idx.classes[cls].method("forward")
    slot = param_names(callee).index(param) - 1 if callee is not None else -1
    for caller in classes:
        info = p.idx.classes[caller]
        fwd = info.method("forward")
        for call in _calls_of(info, fwd, cls) if fwd is not None else []:
            pos = [a for a in call.args if a.keyword is None and not a.star]
            arg = next((a.value for a in call.args if a.keyword and a.keyword.value == param), None) or (
                pos[slot].value if 0 <= slot < len(pos) else None)
            if not isinstance(arg, cst.Name):
                continue
            if arg.value in param_names(fwd):
                found = _origin(p, classes, caller, arg.value, seen)
            else:
                found = _computed_by(p, info, fwd, arg.value)
            if found is not None:
                return found
    return None


def _computed_by(p: Planner, info: ClassInfo, fwd: cst.FunctionDef, name: str) -> str | None:
    """The class of a sub-module whose call FWD binds NAME to, when it is a relative-position table."""
    for a in findall(fwd, m.Assign(value=m.Call())):
        if name not in {n for t in a.targets for n in assigned_names(t.target)}:  # type: ignore[attr-defined]
            continue
        sub = info.submodules.get(self_attr(a.value.func) or "")  # type: ignore[attr-defined]
        if sub is not None and sub.ctor in p.idx.classes and _relative_table(p.idx.classes[sub.ctor]):
            return sub.ctor
    return None


def _relative_table(info: ClassInfo) -> bool:
    """INFO's forward looks up an `nn.Parameter` of its own (`F.embedding(idx, self.W)`, `self.W[idx]`)
    by an index computed from a difference of positions."""
    init, fwd = info.method("__init__"), info.method("forward")
    if init is None or fwd is None:
        return False
    tables = {self_attr(a.targets[0].target) for a in findall(init, m.Assign(value=m.Call()))  # type: ignore[attr-defined]
              if (dotted(a.value.func) or "").split(".")[-1] == "Parameter"}  # type: ignore[attr-defined]
    indices: list[cst.BaseExpression] = []
    for c in findall(fwd, m.Call()):
        if dotted(c.func) in _EMBEDDING and len(c.args) >= 2 and self_attr(c.args[1].value) in tables:  # type: ignore[attr-defined]
            indices.append(c.args[0].value)  # type: ignore[attr-defined]
    for s in findall(fwd, m.Subscript(value=m.Attribute(value=m.Name("self")))):
        if self_attr(s.value) in tables:  # type: ignore[attr-defined]
            indices.append(s)
    return any(_from_difference(info, fwd, i) for i in indices)


def _from_difference(info: ClassInfo, fwd: cst.FunctionDef, index: cst.BaseExpression) -> bool:
    """INDEX is computed (through FWD's assignments and the class's own methods it calls) from a
    difference `a - b` of two position tensors (each a parameter of FWD, or a `torch.arange`)."""
    params = set(param_names(fwd)) - {"self"}
    values: list[cst.BaseExpression] = [index]
    names, seen = set(names_in(index)), set()
    while names - seen:
        n = (names - seen).pop()
        seen.add(n)
        for a in findall(fwd, m.Assign()):
            if n in {x for t in a.targets for x in assigned_names(t.target)}:  # type: ignore[attr-defined]
                values.append(a.value)  # type: ignore[attr-defined]
                names |= names_in(a.value)  # type: ignore[attr-defined]
    for v in values:
        for d in findall(v, m.BinaryOperation(operator=m.Subtract())):
            sides = (d.left, d.right)  # type: ignore[attr-defined]
            if all(names_in(s) & params or findall(s, m.Call(func=m.Attribute(attr=m.Name("arange")))) for s in sides):
                return True
    return False
