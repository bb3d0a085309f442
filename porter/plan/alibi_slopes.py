"""The ALiBi slopes a bias producer computes: the engine's are 2^(-8i/n) (a maximum bias of 8).

MPT's `build_mpt_alibi_tensor(num_heads, sequence_length, alibi_bias_max=8)` scales its exponents by
`alibi_bias_max / n`: the engine's slopes only for 8. HF's MPT never passes it (the default 8 holds
for every config, whatever `attn_config.alibi_bias_max` says); a source that passes another value
is refused, naming the call."""

from __future__ import annotations

from typing import TYPE_CHECKING

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, dotted, findall
from porter.plan.refusals import Refusal

if TYPE_CHECKING:
    from porter.analysis.index import ModelIndex
    from porter.plan.model import PlanningContext as Planner

ALIBI_MAX_BIAS = Refusal(
    "ALiBi slopes of a maximum bias {value}, not 8: the engine's Attention computes 2^(-8i/n)",
    "import torch\nfrom torch import nn\n\n\n"
    "def build_alibi(n, max_bias=8):\n"
    "    return 1.0 / torch.pow(2, torch.arange(1, n + 1) * (max_bias / n))\n\n\n"
    "class Attn(nn.Module):\n    def __init__(self, config):\n        self.head_dim = 32\n"
    "        self.q_proj = nn.Linear(128, 128)\n        self.k_proj = nn.Linear(128, 128)\n"
    "        self.v_proj = nn.Linear(128, 128)\n        self.o_proj = nn.Linear(128, 128)\n\n"
    "    def forward(self, x, alibi):\n"
    "        q = self.q_proj(x)\n        k = self.k_proj(x)\n        v = self.v_proj(x)\n"
    "        out, _ = attention_interface(self, q, k, v, None, alibi=alibi)\n        return self.o_proj(out)\n\n\n"
    "class Model(nn.Module):\n    def forward(self, x):\n        alibi = build_alibi(4, max_bias=16)\n"
    "        return self.attn(x, alibi)\n",
    "<example>:27: ALiBi slopes of a maximum bias 16, not 8: the engine's Attention computes 2^(-8i/n) in "
    "Model.forward: build_alibi(4, max_bias=16) (rule alibi-arm)",
    rule="alibi-arm",
)


def _callee(idx: ModelIndex, cls: str | None, call: cst.Call) -> cst.FunctionDef | None:
    name = dotted(call.func) or ""
    if name.startswith("self.") and cls and (info := idx.classes.get(cls)) is not None:
        return info.method(name[5:])
    return idx.functions.get(name)  # type: ignore[return-value]


def _bind(fn: cst.FunctionDef, call: cst.Call, method: bool, outer: dict[str, str]) -> dict[str, str]:
    """Parameter -> the code of what the call gives it (its default where not given)."""
    params = [p for p in fn.params.params][1 if method else 0:]
    pos = [a.value for a in call.args if a.keyword is None and not a.star]
    kw = {a.keyword.value: a.value for a in call.args if a.keyword is not None}
    out: dict[str, str] = {}
    for i, p in enumerate(params):
        value = pos[i] if i < len(pos) else kw.get(p.name.value, p.default)
        if value is not None:
            out[p.name.value] = outer.get(code(value), code(value))
    return out


def max_bias(idx: ModelIndex, cls: str | None, call: cst.Call, outer: dict[str, str] | None = None,
             depth: int = 0) -> str | None:
    """What the slope producer `call` divides by the head count to scale its exponents (MPT's
    `alibi_bias_max / num_heads_power_of_2`), followed through wrappers that pass it on."""
    fn = _callee(idx, cls, call)
    if fn is None or depth > 3:
        return None
    bound = _bind(fn, call, (dotted(call.func) or "").startswith("self."), outer or {})
    for div in findall(fn, m.BinaryOperation(operator=m.Divide(), left=m.Name())):
        if div.left.value in bound:  # type: ignore[attr-defined]
            return bound[div.left.value]  # type: ignore[attr-defined]
    for inner in findall(fn, m.Return(value=m.Call())):
        found = max_bias(idx, cls, inner.value, bound, depth + 1)  # type: ignore[attr-defined]
        if found is not None:
            return found
    return None


def check_alibi_max_bias(p: Planner, classes: list[str], name: str) -> None:
    """Refuse a bias bound to `name` (the attention's ALiBi argument) built with a maximum bias other than 8."""
    fwds = {cls: fwd for cls in classes if (fwd := p.idx.classes[cls].method("forward")) is not None}
    names = {name}  # and what the callers pass as it: MPT's model binds `alibi`, passed on as `position_bias=alibi`
    for fwd in fwds.values():
        names |= {a.value.value for a in findall(fwd, m.Arg(keyword=m.Name(name), value=m.Name()))}  # type: ignore[attr-defined]
    for cls, fwd in fwds.items():
        for node in findall(fwd, m.Assign(targets=[m.AssignTarget(m.Name(m.MatchIfTrue(lambda n: n in names)))],
                                          value=m.Call())):
            value = max_bias(p.idx, cls, node.value)  # type: ignore[attr-defined]
            if value is not None and value not in ("8", "8.0"):
                raise ALIBI_MAX_BIAS.error(p, node.value, f"{cls}.forward: {code(node.value)}", value=value)  # type: ignore[attr-defined]
