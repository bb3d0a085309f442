"""PT200 correction-bias: the rule `CorrectionBias`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import self_attr
from porter.analysis.moe import MoePlan
from porter.passes.base import Example, Rule

_BEFORE = '''
class AMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.experts = FusedMoEFactory(num_experts=config.n_experts, e_score_correction_bias=self.gate.e_score_correction_bias)
        self.gate = GateLinear(config.hidden_size, config.n_experts, prefix=f"{prefix}.gate")
'''
_AFTER = '''
class AMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate = GateLinear(config.hidden_size, config.n_experts, prefix=f"{prefix}.gate")
        self.gate.e_score_correction_bias = nn.Parameter(torch.empty(config.n_experts, dtype=torch.float32))
        self.experts = FusedMoEFactory(num_experts=config.n_experts, e_score_correction_bias=self.gate.e_score_correction_bias)
'''
_BLOCK_BEFORE = '''
class AMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate = GateLinear(config.hidden_size, config.n_experts, prefix=f"{prefix}.gate")
        self.experts = FusedMoEFactory(num_experts=config.n_experts, e_score_correction_bias=self.bias)
        self.bias = nn.Buffer(torch.zeros(config.n_experts))
'''
_BLOCK_AFTER = '''
class AMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate = GateLinear(config.hidden_size, config.n_experts, prefix=f"{prefix}.gate")
        self.bias = nn.Parameter(torch.zeros(config.n_experts), requires_grad=False)
        self.experts = FusedMoEFactory(num_experts=config.n_experts, e_score_correction_bias=self.bias)
'''


def _seed(bias: str) -> dict:
    """The plan of the examples' block (what porter/analysis/moe.py reads from a whole model)."""
    return {"moes": [MoePlan(
        cls="AMoE", router="gate", router_cls="ARouter", experts="experts", experts_cls="AExperts",
        num_experts="config.n_experts", top_k="2", hidden_size="config.hidden_size", intermediate_size="8",
        renormalize="True", activation='"silu"', gate_up="gate_up_proj", down="down_proj", line=1,
        scoring_func="sigmoid", correction_bias=bias)]}


class CorrectionBias(Rule):
    code = "PT200"
    name = "correction-bias"
    why = (
        "A router that ranks the scores plus a per-expert correction bias (the weights gathered "
        "from the scores without it) hands that bias to `FusedMoE` (`e_score_correction_bias`), "
        "which therefore needs it built first. A router's own bias goes where the engine's ports "
        "keep it, on the gate (`self.gate.e_score_correction_bias`, float32, the checkpoint's "
        "`<block>.gate.e_score_correction_bias`); a bias the block holds and passes to its router "
        "stays on the block, a parameter the loader fills (an `nn.Buffer` is not one). Either is "
        "built before the experts that read it."
    )
    examples = [
        Example(_BEFORE, _AFTER, seed=_seed("gate")),
        Example(_BLOCK_BEFORE, _BLOCK_AFTER, seed=_seed("bias")),
        # a parameter already built before the experts that read it: left as it is
        Example(_BLOCK_AFTER, _BLOCK_AFTER, seed=_seed("bias")),
    ]
    descend_methods = frozenset()

    @classmethod
    def applies(cls, ctx) -> bool:
        return any(p.correction_bias for p in ctx.plan.moes)

    @classmethod
    def classes(cls, ctx) -> set[str]:
        return {p.cls for p in ctx.plan.moes if p.correction_bias}

    def leave_FunctionDef(self, original, updated):
        mp = self.plan.moe(self.current_class or "")
        if mp is None or not mp.correction_bias or updated.name.value != "__init__":
            return super().leave_FunctionDef(original, updated)
        body = list(updated.body.body)
        pos = {attr: i for i, st in enumerate(body) if (attr := _assigned_attr(st)) is not None}
        held = "gate" if mp.correction_bias == "gate" else mp.correction_bias  # the bias's holder
        if mp.experts not in pos or "gate" not in pos or held not in pos:
            return super().leave_FunctionDef(original, updated)
        originals = [body[pos["gate"]]] if held == "gate" else [body[pos["gate"]], body[pos[held]]]
        moved = list(originals)
        if held == "gate":
            moved.append(cst.parse_statement(
                f"self.gate.e_score_correction_bias = nn.Parameter(torch.empty({mp.num_experts}, dtype=torch.float32))"))
        else:
            moved[-1] = _as_parameter(moved[-1])
        # the moved statements go together where the first of them or the experts stood
        at = min(pos[mp.experts], pos["gate"], pos[held])
        rest = [st for st in body if all(st is not x for x in originals)]
        new = rest[:at] + moved + rest[at:]
        return super().leave_FunctionDef(original, updated.with_changes(body=updated.body.with_changes(body=new)))


def _assigned_attr(st: cst.CSTNode) -> str | None:
    if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))])])):
        return self_attr(st.body[0].targets[0].target)  # type: ignore[attr-defined]
    return None


def _as_parameter(st: cst.SimpleStatementLine) -> cst.SimpleStatementLine:
    """`self.b = nn.Buffer(t)` -> `self.b = nn.Parameter(t, requires_grad=False)`."""
    assign = st.body[0]
    value = assign.value  # type: ignore[attr-defined]
    if not m.matches(value, m.Call(func=m.Attribute(attr=m.Name("Buffer")))):
        return st
    call = value.with_changes(func=value.func.with_changes(attr=cst.Name("Parameter")), args=[
        value.args[0].with_changes(comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))),
        cst.Arg(cst.Name("False"), keyword=cst.Name("requires_grad"),
                equal=cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace("")))])
    return st.with_changes(body=[assign.with_changes(value=call)])  # type: ignore[attr-defined]
