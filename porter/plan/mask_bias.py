"""A bias folded into the attention mask the layers are handed: ALiBi, or refused.

transformers 5.25's Falcon builds its ALiBi bias in the model's forward and adds it to the mask
(`causal_mask = torch.masked_fill(alibi / ..., ...)`, `block(..., attention_mask=causal_mask)`)
instead of handing it to the attention. The engine's attention takes no mask: the port would drop
the bias. When the bias is built under a config test (`if self.use_alibi:`) and divided by a value
each attention holds the inverse of (`alibi / math.sqrt(hidden // heads)`: Falcon's
`inv_norm_factor`), it is the attentions' ALiBi (the engine's `alibi_slopes` times that scale,
PT021), as when the attention call receives it (`alibi=`, PT150); any other tensor computed by a
function of the file and added to a mask passed on is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import assigned_names, code, dotted, findall, names_in
from porter.analysis.layouts import alibi_condition
from porter.analysis.qkv_layout import same_value_attr
from porter.plan.refusals import Refusal, attention_example

if TYPE_CHECKING:
    from porter.plan.model import PlanningContext as Planner, PortPlan

MASK_BIAS = Refusal(
    "cannot port a bias added to the attention mask: the engine's attention takes no mask (an ALiBi "
    "bias built under a config test and scaled as the attention's scores is ported)",
    attention_example() + "\n\nclass Layer(nn.Module):\n    def __init__(self, config):\n        self.attn = Attn(config)\n\n\n"
    "class Model(nn.Module):\n    def __init__(self, config):\n"
    "        self.layers = nn.ModuleList([Layer(config) for _ in range(2)])\n\n"
    "    def forward(self, x, attention_mask=None):\n        bias = make_bias(x)\n"
    "        mask = attention_mask + bias\n        for layer in self.layers:\n"
    "            x = layer(x, attention_mask=mask)\n        return x\n\n\n"
    "def make_bias(x):\n    return x.sum(-1)\n",
    "<example>:32: cannot port a bias added to the attention mask: the engine's attention takes no mask (an "
    "ALiBi bias built under a config test and scaled as the attention's scores is ported) in Model.forward: "
    "mask = ... bias (make_bias) (rule engine-attention)",
    rule="engine-attention",
)


def _found(p: Planner, fwd, received: set[str]):
    """(the assignment folding a bias into a mask passed on, the bias name, its function) or None."""
    made = {}  # local -> the function of the file whose result it holds
    for a in findall(fwd, m.Assign(value=m.Call(func=m.Name()))):
        fn = dotted(a.value.func)  # type: ignore[attr-defined]
        if fn in p.idx.functions:
            for t in a.targets:  # type: ignore[attr-defined]
                made.update(dict.fromkeys(assigned_names(t.target), fn))
    masks = {kw.value.value for kw in findall(fwd, m.Arg(keyword=m.Name(m.MatchIfTrue(lambda k: "mask" in k)),
                                                            value=m.Name()))}  # type: ignore[attr-defined]
    for a in findall(fwd, m.Assign()):
        bound = {n for t in a.targets for n in assigned_names(t.target)}  # type: ignore[attr-defined]
        bias = sorted((names_in(a.value) & set(made)) - received)  # type: ignore[attr-defined]
        if bound & masks and bias:
            return a, bias[0], made[bias[0]]
    return None


def mask_bias(p: Planner, plan: PortPlan, classes: list[str]) -> None:
    """A bias folded into the mask: ported as the attentions' ALiBi when it is built under a config
    test, every attention receives no bias of its own, and it is scaled by a divisor whose inverse
    is an attribute of each attention (the engine adds slopes times that scale after the scores'
    own scale, as HF adds the mask); refused otherwise."""
    received = {a.alibi for a in plan.attentions if a.alibi}
    for name in classes:
        fwd = p.idx.classes[name].method("forward") if name in p.idx.classes else None
        found = _found(p, fwd, received) if fwd is not None else None
        if found is None:
            continue
        a, bias, fn = found
        scales = _scales(p, name, a.value, bias, plan) if plan.attentions and not received else None  # type: ignore[attr-defined]
        when = alibi_condition(p.idx, classes, bias)
        if scales is None or when is None:
            target = code(a.targets[0].target)  # type: ignore[attr-defined]
            raise MASK_BIAS.error(p, a, f"{name}.forward: {target} = ... {bias} ({fn})")
        for attn, scale in zip(plan.attentions, scales):
            attn.alibi, attn.alibi_scale, attn.alibi_when = bias, scale, when
        received.add(bias)


def _scales(p: Planner, model: str, value, bias: str, plan: PortPlan) -> list[str] | None:
    """Per attention: `self.X` equal to 1 / D where the mask adds `BIAS / D` (BIAS maybe reshaped
    first)."""
    divs = [d.right for d in findall(value, m.BinaryOperation(operator=m.Divide(), left=m.Name(bias)))]  # type: ignore[attr-defined]
    if len(divs) != 1:
        return None
    inverse = cst.BinaryOperation(cst.Integer("1"), cst.Divide(), divs[0])
    out = []
    for attn in plan.attentions:
        attr = same_value_attr(p.idx.classes[model], inverse, p.idx.classes[attn.cls])
        if attr is None:
            return None
        out.append(f"self.{attr}")
    return out
