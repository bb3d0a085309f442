"""PT201 routing-function: the rule `RoutingFunction`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import self_attr
from porter.analysis.moe import MoePlan
from porter.passes.base import Example, Rule

_BEFORE = '''
class ARouter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.n_experts, config.hidden_size))
        self.norm_min = config.norm_min
        self.scale = nn.Buffer(torch.ones(config.n_experts))

    def forward(self, hidden_states):
        router_logits = F.linear(hidden_states.float(), self.weight.float())
        weights = F.softmax(router_logits, dim=1)
        weights, idx = torch.topk(weights, 2, dim=-1)
        weights = weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=self.norm_min)
        return router_logits, weights, idx


class AMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.experts = FusedMoEFactory(num_experts=config.n_experts, custom_routing_function=self.gate.route)
        self.gate = ARouter(config, prefix=f"{prefix}.gate")
'''
_AFTER = '''
class ARouter(GateLinear):
    def __init__(self, config, prefix: str = ""):
        super().__init__(config.hidden_size, config.n_experts, prefix=prefix)
        self.norm_min = config.norm_min
        self.scale = nn.Parameter(torch.ones(config.n_experts), requires_grad=False)

    def route(self, hidden_states, gating_output, topk, renormalize):
        router_logits = gating_output
        weights = F.softmax(router_logits, dim=1)
        weights, idx = torch.topk(weights, 2, dim=-1)
        weights = weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=self.norm_min)
        return weights, idx


class AMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate = ARouter(config, prefix=f"{prefix}.gate")
        self.experts = FusedMoEFactory(num_experts=config.n_experts, custom_routing_function=self.gate.route)
'''


# a router handed a bias by its block (lfm2_moe's `self.gate(x, expert_bias)`): the route keeps the
# parameter, the block binds it (functools.partial, written by PT100) and builds what it binds first
_BOUND_BEFORE = '''
class ARouter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.n_experts, config.hidden_size))

    def forward(self, hidden_states, bias=None):
        router_logits = F.linear(hidden_states, self.weight)
        scores = router_logits.sigmoid()
        _, idx = torch.topk(scores + bias, 2, dim=-1)
        weights = scores.gather(1, idx)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-6)
        return router_logits, weights, idx


class AMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.experts = FusedMoEFactory(num_experts=config.n_experts, custom_routing_function=partial(self.gate.route, bias=self.bias))
        self.gate = ARouter(config, prefix=f"{prefix}.gate")
        self.bias = nn.Buffer(torch.zeros(config.n_experts))

    def forward(self, hidden_states):
        bias = self.bias
        router_logits, _ = self.gate(hidden_states)
        return self.experts(hidden_states=hidden_states, router_logits=router_logits)
'''
_BOUND_AFTER = '''
class ARouter(GateLinear):
    def __init__(self, config, prefix: str = ""):
        super().__init__(config.hidden_size, config.n_experts, prefix=prefix)

    def route(self, hidden_states, gating_output, topk, renormalize, bias=None):
        router_logits = gating_output
        scores = router_logits.sigmoid()
        _, idx = torch.topk(scores + bias, 2, dim=-1)
        weights = scores.gather(1, idx)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-6)
        return weights, idx


class AMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate = ARouter(config, prefix=f"{prefix}.gate")
        self.bias = nn.Parameter(torch.zeros(config.n_experts), requires_grad=False)
        self.experts = FusedMoEFactory(num_experts=config.n_experts, custom_routing_function=partial(self.gate.route, bias=self.bias))

    def forward(self, hidden_states):
        router_logits, _ = self.gate(hidden_states)
        return self.experts(hidden_states=hidden_states, router_logits=router_logits)
'''


def _seed(**extra) -> dict:
    """The plan of the example's block (what porter/analysis/moe.py reads from a whole model)."""
    return {"moes": [MoePlan(**extra, **{
        "cls": "AMoE", "router": "gate", "router_cls": "ARouter", "experts": "experts", "experts_cls": "AExperts",
        "num_experts": "config.n_experts", "top_k": "2", "hidden_size": "config.hidden_size",
        "intermediate_size": "8", "renormalize": "False", "activation": '"silu"', "gate_up": "gate_up_proj",
        "down": "down_proj", "line": 1, "routing_function": True, "router_logits": "router_logits",
        "route_outputs": [1, 2], "router_dims": ["config.hidden_size", "config.n_experts"]})]}


class RoutingFunction(Rule):
    code = "PT201"
    name = "routing-function"
    why = (
        "A router whose steps after the projection are not the engine's (a renormalisation clamped "
        "below, ernie4_5_moe; a sparsemixer, phimoe) is not approximated: the router class stays, "
        "and runs its own code. It becomes a `GateLinear` (the projection, its weight where the "
        "checkpoint has it), and its forward becomes `route(hidden_states, gating_output, topk, "
        "renormalize)`, the signature of FusedMoE's `custom_routing_function`: the same statements "
        "on the logits the gate computed, returning the weights and indices the experts read. The "
        "block passes `self.gate.route` to FusedMoE and builds the gate first. What the block hands "
        "its router beside the hidden states (lfm2_moe's correction bias, a buffer of the block) stays a "
        "parameter of `route`, bound by the block (`functools.partial`): the block builds it first, as "
        "a parameter the loader fills, and the experts last; its now unread local goes."
    )
    examples = [Example(_BEFORE, _AFTER, seed=_seed()),
                Example(_BOUND_BEFORE, _BOUND_AFTER, seed=_seed(route_args=[["bias", "self.bias"]]))]
    descend_methods = frozenset()

    @classmethod
    def applies(cls, ctx) -> bool:
        return any(p.routing_function for p in ctx.plan.moes)

    @classmethod
    def classes(cls, ctx) -> set[str]:
        return {c for p in ctx.plan.moes if p.routing_function for c in (p.cls, p.router_cls)}

    def _router(self) -> MoePlan | None:
        return next((p for p in self.plan.moes if p.routing_function and p.router_cls == self.current_class), None)

    def leave_ClassDef(self, original, updated):
        if self._router() is not None:
            updated = updated.with_changes(bases=[cst.Arg(cst.Name(self.ctx.use("GateLinear")))])
        return super().leave_ClassDef(original, updated)

    def leave_FunctionDef(self, original, updated):
        block = self.plan.moe(self.current_class or "")
        router = self._router()
        if block is not None and block.routing_function and updated.name.value == "__init__":
            updated = _gate_first(updated, block.experts)
            if block.route_args:
                updated = _bound_first(updated, block)
        elif block is not None and block.route_args and updated.name.value == "forward":
            updated = _unread_locals(updated, block)
        elif router is not None and updated.name.value == "__init__":
            updated = _gate_init(updated, router)
        elif router is not None and updated.name.value == "forward":
            updated = _route(updated, router)
        return super().leave_FunctionDef(original, updated)


def _gate_first(fn: cst.FunctionDef, experts: str) -> cst.FunctionDef:
    """FusedMoE reads `self.gate.route`: the gate is built before the experts."""
    body = list(fn.body.body)
    at = {self_attr(st.body[0].targets[0].target): i for i, st in enumerate(body)  # type: ignore[attr-defined]
          if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Attribute())])]))}
    if "gate" not in at or experts not in at or at["gate"] < at[experts]:
        return fn
    gate = body.pop(at["gate"])
    body.insert(at[experts], gate)
    return fn.with_changes(body=fn.body.with_changes(body=body))


def _bound_first(fn: cst.FunctionDef, mp: MoePlan) -> cst.FunctionDef:
    """What the route is bound to (`functools.partial(self.gate.route, expert_bias=self.expert_bias if
    self.use_expert_bias else None)`) exists before FusedMoE reads it: the experts are built last, and
    a persistent buffer it binds (in the checkpoint) is a parameter the loader fills."""
    read = {a.attr.value for _, value in mp.route_args  # type: ignore[attr-defined]
            for a in m.findall(cst.parse_expression(value), m.Attribute(value=m.Name("self")))}
    body = [st.visit(_HeldAsParameter(read)) for st in fn.body.body]
    at = next((i for i, st in enumerate(body) if m.matches(st, m.SimpleStatementLine(body=[m.Assign(
        targets=[m.AssignTarget(m.Attribute(value=m.Name("self"), attr=m.Name(mp.experts)))])]))), None)
    if at is not None:
        body.append(body.pop(at))
    return fn.with_changes(body=fn.body.with_changes(body=body))


class _HeldAsParameter(cst.CSTTransformer):
    """`self.b = nn.Buffer(t)` -> `self.b = nn.Parameter(t, requires_grad=False)` for b in ATTRS."""

    def __init__(self, attrs: set[str]) -> None:
        super().__init__()
        self.attrs = attrs

    def leave_SimpleStatementLine(self, original, updated):
        if not m.matches(updated, _HELD_BUFFER) or self_attr(updated.body[0].targets[0].target) not in self.attrs:
            return updated
        return _as_parameter(updated)


def _as_parameter(st: cst.SimpleStatementLine) -> cst.SimpleStatementLine:
    value = st.body[0].value  # type: ignore[attr-defined]
    return st.with_changes(body=[st.body[0].with_changes(value=value.with_changes(  # type: ignore[attr-defined]
        func=value.func.with_changes(attr=cst.Name("Parameter")), args=[
            value.args[0].with_changes(comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))),
            cst.Arg(cst.Name("False"), keyword=cst.Name("requires_grad"),
                    equal=cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace("")))]))])


def _unread_locals(fn: cst.FunctionDef, mp: MoePlan) -> cst.FunctionDef:
    """A local the block bound only to hand its router (`expert_bias = self.expert_bias if ...`), read
    by nothing now that the route is bound to it, goes."""
    body = list(fn.body.body)
    out = []
    for i, st in enumerate(body):
        if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())])])):
            name = st.body[0].targets[0].target.value  # type: ignore[attr-defined]
            value = cst.Module(body=[]).code_for_node(st.body[0].value)  # type: ignore[attr-defined]
            if any(value == v for _, v in mp.route_args) and not any(
                    n.value == name for later in body[i + 1:] for n in m.findall(later, m.Name())):
                continue
        out.append(st)
    return fn.with_changes(body=fn.body.with_changes(body=out))


def _gate_init(fn: cst.FunctionDef, mp: MoePlan) -> cst.FunctionDef:
    """`super().__init__()` -> `super().__init__(hidden, experts, prefix=prefix)`; the router's own
    projection (now the GateLinear's weight) is no longer built."""
    hidden, experts = mp.router_dims
    weight = mp.router_weight.partition(".")[0]
    body = []
    for st in fn.body.body:
        if m.matches(st, m.SimpleStatementLine(body=[m.Expr(m.Call(func=m.Attribute(
                value=m.Call(func=m.Name("super")), attr=m.Name("__init__"))))])):
            st = cst.parse_statement(f"super().__init__({hidden}, {experts}, prefix=prefix)")
        elif m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Attribute(
                value=m.Name("self"), attr=m.Name(weight)))])])):
            continue
        elif m.matches(st, _HELD_BUFFER):
            # a persistent buffer the routing reads (kolibri1's correction bias), in the checkpoint:
            # a parameter the loader fills
            st = _as_parameter(st)
        body.append(st)
    params = fn.params
    if "prefix" not in [p.name.value for p in params.params]:
        params = params.with_changes(params=[*params.params, cst.Param(
            cst.Name("prefix"), annotation=cst.Annotation(cst.Name("str")), default=cst.SimpleString('""'),
            equal=cst.AssignEqual(cst.SimpleWhitespace(" "), cst.SimpleWhitespace(" ")))])
    return fn.with_changes(params=params, body=fn.body.with_changes(body=body))


# `self.b = nn.Buffer(t)` (persistent: saved with the checkpoint)
_HELD_BUFFER = m.SimpleStatementLine(body=[m.Assign(
    targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))],
    value=m.Call(func=m.Attribute(attr=m.Name("Buffer")), args=[m.Arg(keyword=None)]))])


class _Route(cst.CSTTransformer):
    """The forward's logits become the gate's; its return, what the experts read."""

    def __init__(self, mp: MoePlan) -> None:
        super().__init__()
        self.mp, self.done = mp, False

    def leave_Assign(self, original, updated):
        # the first assignment of the logits is the projection (a later one transforms them:
        # laguna's soft cap, which stays)
        if not self.done and m.matches(updated, m.Assign(targets=[m.AssignTarget(m.Name(self.mp.router_logits))])):
            self.done = True
            return updated.with_changes(value=cst.Name("gating_output"))
        return updated

    def leave_Return(self, original, updated):
        w, i = self.mp.route_outputs
        els = updated.value.elements  # type: ignore[union-attr]
        return updated.with_changes(value=cst.Tuple([
            els[w].with_changes(comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))),
            els[i].with_changes(comma=cst.MaybeSentinel.DEFAULT)], lpar=[], rpar=[]))


def _route(fn: cst.FunctionDef, mp: MoePlan) -> cst.FunctionDef:
    first = fn.params.params[1].name.value if len(fn.params.params) > 1 else "hidden_states"
    # what the block hands the router beside the hidden states stays a parameter (bound by the block)
    bound = "".join(f", {cst.Module(body=[]).code_for_node(p.with_changes(comma=cst.MaybeSentinel.DEFAULT))}"
                    for p in fn.params.params[2:] if p.name.value in {n for n, _ in mp.route_args})
    params = cst.parse_statement(f"def route(self, {first}, gating_output, topk, renormalize{bound}): pass").params  # type: ignore[attr-defined]
    if first != "hidden_states":  # FusedMoE passes it by keyword
        fn = fn.visit(_Rename(first))  # type: ignore[assignment]
        params = cst.parse_statement(f"def route(self, hidden_states, gating_output, topk, renormalize{bound}): pass").params  # type: ignore[attr-defined]
    fn = fn.visit(_Route(mp)).with_changes(name=cst.Name("route"), params=params, returns=None)  # type: ignore[attr-defined]
    return fn.with_changes(body=fn.body.with_changes(body=_unread_before_logits(list(fn.body.body), mp.router_logits)))


def _unread_before_logits(body: list, logits: str) -> list:
    """The locals the projection's input needed (ernie4_5_moe's `device_type` for its autocast),
    read by nothing once the logits are the gate's, go."""
    from porter.analysis.cstutil import findall

    out = []
    for i, st in enumerate(body):
        if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name(logits))])])):
            return out + body[i:]
        if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())])])):
            name = st.body[0].targets[0].target.value
            if not any(n.value == name for later in body[i + 1:] for n in findall(later, m.Name())) \
                    and not findall(st, m.Call(func=m.Attribute(attr=m.Name(m.MatchIfTrue(lambda a: a.endswith("_")))))):
                continue
        out.append(st)
    return body


class _Rename(cst.CSTTransformer):
    def __init__(self, old: str) -> None:
        super().__init__()
        self.old = old

    def leave_Name(self, original, updated):
        return cst.Name("hidden_states") if updated.value == self.old else updated
