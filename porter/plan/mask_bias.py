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


def _found(p: Planner, fwd, received: set[str], cls: str | None = None):
    """(the assignment folding a bias into a mask passed on, the bias name, its function) or None."""
    made = {}  # local -> the function of the file (or method of the class) whose result it holds
    info = p.idx.classes.get(cls) if cls else None
    for a in findall(fwd, m.Assign(value=m.Call(func=m.Name() | m.Attribute(value=m.Name("self"))))):
        fn = dotted(a.value.func)  # type: ignore[attr-defined]
        method = fn[5:] if fn and fn.startswith("self.") else None
        if fn in p.idx.functions or (method and info is not None and info.method(method) is not None):
            for t in a.targets:  # type: ignore[attr-defined]
                made.update(dict.fromkeys(assigned_names(t.target), fn))
    masks = {kw.value.value for kw in findall(fwd, m.Arg(keyword=m.Name(m.MatchIfTrue(lambda k: "mask" in k)),
                                                            value=m.Name()))}  # type: ignore[attr-defined]
    for a in findall(fwd, m.Assign()):
        bound = {n for t in a.targets for n in assigned_names(t.target)}  # type: ignore[attr-defined]
        bias = sorted((names_in(a.value) & set(made)) - received - bound)  # type: ignore[attr-defined]
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
        found = _found(p, fwd, received, name) if fwd is not None else None
        if found is None:
            continue
        a, bias, fn = found
        scales = _scales(p, name, a.value, bias, plan) if plan.attentions and not received else None  # type: ignore[attr-defined]
        when = alibi_condition(p.idx, classes, bias)
        if scales == [None] * len(plan.attentions) and (when is not None or not _per_head_positions(p, name, fn, plan)):
            scales = None  # unscaled and not seen to be a per-head function of positions: not known to be ALiBi
        if scales is not None and any(_scaled_after_mask(p, attn.cls) for attn in plan.attentions):
            scales = None  # the attention scales the scores after adding the mask: the bias would be scaled too
        if scales is None or (when is None and scales != [None] * len(plan.attentions)):
            target = code(a.targets[0].target)  # type: ignore[attr-defined]
            raise MASK_BIAS.error(p, a, f"{name}.forward: {target} = ... {bias} ({fn})")
        for attn, scale in zip(plan.attentions, scales):
            attn.alibi, attn.alibi_scale, attn.alibi_when = bias, scale, when
        received.add(bias)


def _scales(p: Planner, model: str, value, bias: str, plan: PortPlan) -> list[str | None] | None:
    """Per attention: `self.X` equal to 1 / D where the mask adds `BIAS / D` (BIAS maybe reshaped
    first); None for each where every fold adds BIAS itself (`_unscaled_fold`)."""
    divs = [d.right for d in findall(value, m.BinaryOperation(operator=m.Divide(), left=m.Name(bias)))]  # type: ignore[attr-defined]
    if not divs and _unscaled_fold(p, model, bias):
        return [None] * len(plan.attentions)  # added as it is: the engine's slopes unscaled
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


def _unscaled_fold(p: Planner, model: str, bias: str) -> bool:
    """Every statement of the model's forward that reads BIAS adds it (maybe reshaped: `bias.unsqueeze(0)`)
    to a mask or binds it as the mask itself, dividing or multiplying it by nothing."""
    fwd = p.idx.classes[model].method("forward")
    meta = m.Attribute(value=m.Name(bias), attr=m.Name("dtype") | m.Name("shape") | m.Name("device")) | m.Call(
        func=m.Attribute(value=m.Name(bias), attr=m.Name("size") | m.Name("dim")))

    class _Meta(cst.CSTTransformer):  # what only reads its dtype or sizes reads no value of it
        def leave_Attribute(self, original_node, updated_node):
            return cst.Name("_") if m.matches(updated_node, meta) else updated_node

        def leave_Call(self, original_node, updated_node):
            return cst.Name("_") if m.matches(updated_node, meta) else updated_node

    values = [a.value.visit(_Meta()) for a in findall(fwd, m.Assign())]  # type: ignore[attr-defined]
    reads = [v for v in values if bias in names_in(v)]
    if not reads:
        return False
    for v in reads:
        if findall(v, m.BinaryOperation(operator=m.Multiply() | m.Divide() | m.Power())):
            return False
        if not (m.matches(v, m.Name(bias)) or m.matches(v, m.BinaryOperation(operator=m.Add()))):
            return False
    return True


def _reachable(p: Planner, model: str, fn: str, depth: int = 0) -> list[cst.FunctionDef]:
    """FN (a function of the file or `self.method` of MODEL) and what it calls of the file, transitively."""
    info = p.idx.classes[model]
    node = info.method(fn[5:]) if fn.startswith("self.") else p.idx.functions.get(fn)
    if node is None or depth > 4:
        return []
    out = [node]
    for c in findall(node, m.Call(func=m.Name() | m.Attribute(value=m.Name("self")))):
        callee = dotted(c.func) or ""  # type: ignore[attr-defined]
        if callee != fn and (callee in p.idx.functions or (callee.startswith("self.") and info.method(callee[5:]))):
            out += [f for f in _reachable(p, model, callee, depth + 1) if all(f is not g for g in out)]
    return out


def _per_head_positions(p: Planner, model: str, fn: str, plan: PortPlan) -> bool:
    """What FN computes (through what it calls) is a bias per head of key positions: a function of the
    file is handed the attentions' head count (the slopes), and positions come from `torch.arange`.
    (Which slopes is not read off the code: `porter verify` with a head count that is not a power of
    two compares them.)"""
    bodies = _reachable(p, model, fn)
    if not any(findall(b, m.Call(func=m.Attribute(value=m.Name("torch"), attr=m.Name("arange")))) for b in bodies):
        return False
    heads = set()  # the attention's first attribute holding its head count (`self.num_heads`)
    for attn in plan.attentions:
        info = p.idx.classes[attn.cls]
        heads.add(same_value_attr(info, cst.parse_expression(attn.num_heads), info))
    if None in heads or len(heads) != 1:
        return False
    for b in bodies:
        for c in findall(b, m.Call(func=m.Name())):
            if dotted(c.func) not in p.idx.functions:  # type: ignore[attr-defined]
                continue
            for arg in c.args:  # type: ignore[attr-defined]
                if m.matches(arg.value, m.Attribute(value=m.Name("self"))) and all(
                        same_value_attr(p.idx.classes[model], arg.value, p.idx.classes[a.cls]) in heads
                        for a in plan.attentions):
                    return True
    return False


def _scaled_after_mask(p: Planner, cls: str) -> bool:
    """The attention call PT150 made says the scores are scaled after the mask is added (`mask_scaled=True`)."""
    fwd = p.idx.classes[cls].method("forward")
    return bool(fwd is not None and findall(fwd, m.Arg(keyword=m.Name("mask_scaled"))))
