"""PT209 routing-method: the rule `RoutingMethod`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.moe import MoePlan
from porter.passes.base import Example, Rule

_BEFORE = '''
class AFFN(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.router = ARouter(config)
        self.experts = FusedMoEFactory(num_experts=4, custom_routing_function=self.route_tokens)
        self.p = config.p
        self.top_k = config.top_k

    def route_tokens(self, router_logits):
        router_logits = torch.nn.functional.softmax(router_logits, dim=1, dtype=router_logits.dtype)
        top_value, indices = torch.topk(router_logits, self.top_k, dim=-1)
        if self.p is not None:
            top_value = top_value / torch.norm(top_value, p=self.p, dim=-1, keepdim=True)
        return top_value, indices

    def forward(self, hidden_states):
        router_logits = self.router(hidden_states)
        top_k_weights, top_k_index = self.route_tokens(router_logits)
        output = self.experts(hidden_states=hidden_states, router_logits=router_logits)
        return output
'''
_AFTER = '''
class AFFN(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.router = ARouter(config)
        self.experts = FusedMoEFactory(num_experts=4, custom_routing_function=self.route_tokens)
        self.p = config.p
        self.top_k = config.top_k

    def route_tokens(self, hidden_states, gating_output, topk, renormalize):
        router_logits = gating_output
        router_logits = torch.nn.functional.softmax(router_logits, dim=1, dtype=router_logits.dtype)
        top_value, indices = torch.topk(router_logits, self.top_k, dim=-1)
        if self.p is not None:
            top_value = top_value / torch.norm(top_value, p=self.p, dim=-1, keepdim=True)
        return top_value, indices

    def forward(self, hidden_states):
        router_logits = self.router(hidden_states)
        output = self.experts(hidden_states=hidden_states, router_logits=router_logits)
        return output
'''


def _seed() -> dict:
    """The plan of the example's block (what porter/analysis/moe_flat.py reads from a whole model)."""
    return {"moes": [MoePlan(
        cls="AFFN", router="router", router_cls="ARouter", experts="experts", experts_cls="AExperts",
        num_experts="4", top_k="config.top_k", hidden_size="8", intermediate_size="8", renormalize="False",
        activation='"silu"', gate_up="w1", down="w2", line=1, router_logits="router_logits",
        flat=["mlp", "AGLU", "w1", "v1", "w2"], route_method="route_tokens")]}


class RoutingMethod(Rule):
    code = "PT209"
    name = "routing-method"
    why = (
        "A block that routes with a method of its own (dbrx's `route_tokens_to_experts`: softmax, "
        "top-k, then the top-k weights over their p-norm, `moe_normalize_expert_weights`, which the "
        "engine's renormalisation computes only for p = 1) is not approximated: the method stays and "
        "is FusedMoE's `custom_routing_function` (PT100 hands it over). Its signature becomes that "
        "function's, `(hidden_states, gating_output, topk, renormalize)`, its logits parameter bound "
        "to `gating_output` first; the block's own call of it goes (FusedMoE routes)."
    )
    examples = [Example(_BEFORE, _AFTER, seed=_seed())]
    descend_methods = frozenset({"forward"})

    @classmethod
    def applies(cls, ctx) -> bool:
        return any(p.route_method for p in ctx.plan.moes)

    @classmethod
    def classes(cls, ctx) -> set[str]:
        return {p.cls for p in ctx.plan.moes if p.route_method}

    def _block(self) -> MoePlan | None:
        mp = self.plan.moe(self.current_class or "")
        return mp if mp is not None and mp.route_method else None

    def leave_SimpleStatementLine(self, original, updated):
        mp = self._block()
        if mp is None or self.current_function != "forward" or not m.matches(updated, m.SimpleStatementLine(
                body=[m.Assign(value=m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(mp.route_method))))])):
            return updated
        self.mark()
        return cst.RemoveFromParent()

    def leave_FunctionDef(self, original, updated):
        mp = self._block()
        if mp is not None and len(self.scope) == 2 and updated.name.value == mp.route_method:
            logits = updated.params.params[1].name.value
            params = cst.parse_statement(
                "def route(self, hidden_states, gating_output, topk, renormalize): pass").params  # type: ignore[attr-defined]
            bind = cst.parse_statement(f"{logits} = gating_output\n")
            updated = updated.with_changes(params=params, body=updated.body.with_changes(
                body=[bind, *updated.body.body]))
            self.mark()
        return super().leave_FunctionDef(original, updated)
