"""PT100 fused-moe: the rule `FusedMoe`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import param_names, self_attr, self_call_attr
from porter.passes.base import Example, Rule

_ROUTER = '''
class ATopKRouter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_local_experts
        self.hidden_dim = config.hidden_size
        self.weight = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim))

    def forward(self, hidden_states):
        router_logits = F.linear(hidden_states, self.weight)
        router_probs = torch.nn.functional.softmax(router_logits.float(), dim=-1)
        router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
        router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
        return router_logits, router_top_value, router_indices


class AExperts(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * config.intermediate_size, config.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, config.intermediate_size))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for expert_idx in range(self.num_experts):
            token_idx, pos = torch.where(top_k_index == expert_idx)
            gate, up = nn.functional.linear(hidden_states[token_idx], self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            h = nn.functional.linear(self.act_fn(gate) * up, self.down_proj[expert_idx])
            out.index_add_(0, token_idx, h * top_k_weights[token_idx, pos, None])
        return out
'''


# the same experts stored (experts, in, out) and applied as `x @ W[e]` (Aria)
_ROUTER_T = _ROUTER.replace(
    "torch.empty(self.num_experts, 2 * config.intermediate_size, config.hidden_size)",
    "torch.empty(self.num_experts, config.hidden_size, 2 * config.intermediate_size)").replace(
    "torch.empty(self.num_experts, config.hidden_size, config.intermediate_size)",
    "torch.empty(self.num_experts, config.intermediate_size, config.hidden_size)").replace(
    "nn.functional.linear(hidden_states[token_idx], self.gate_up_proj[expert_idx])",
    "(hidden_states[token_idx] @ self.gate_up_proj[expert_idx])").replace(
    "nn.functional.linear(self.act_fn(gate) * up, self.down_proj[expert_idx])",
    "(self.act_fn(gate) * up) @ self.down_proj[expert_idx]")


_OAI = '''
class ARouter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.zeros(config.num_local_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(config.num_local_experts))

    def forward(self, hidden_states):
        router_logits = F.linear(hidden_states, self.weight, self.bias)
        top_value, top_index = torch.topk(router_logits, self.top_k, dim=-1)
        scores = torch.nn.functional.softmax(top_value, dim=1, dtype=top_value.dtype)
        return router_logits, scores, top_index


class AExperts(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, 2 * config.intermediate_size))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(self.num_experts, 2 * config.intermediate_size))
        self.down_proj = nn.Parameter(torch.empty((self.num_experts, config.intermediate_size, config.hidden_size)))
        self.down_proj_bias = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        self.alpha = config.swiglu_alpha
        self.limit = config.swiglu_limit

    def _apply_gate(self, gate_up):
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha)
        gated_output = (up + 1) * glu
        return gated_output

    def forward(self, hidden_states, router_indices, routing_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            token_idx, pos = torch.where(router_indices == e)
            gate_up = hidden_states[token_idx] @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]
            gated = self._apply_gate(gate_up)
            h = gated @ self.down_proj[e] + self.down_proj_bias[e]
            out.index_add_(0, token_idx, h * routing_weights[token_idx, pos, None])
        return out
'''
_OAI_BLOCK = (
    "\n\nclass AMLP(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.router = ARouter(config)\n        self.experts = AExperts(config)\n\n"
    "    def forward(self, hidden_states):\n"
    "        _, scores, index = self.router(hidden_states)\n"
    "        out = self.experts(hidden_states, index, scores)\n"
    "        return out, scores\n"
)


# dbrx: a router returning logits only, a routing method of the block, the experts' weights held flat
# by a module inside them (porter/analysis/moe_flat.py)
_FLAT = '''
class ARouter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.Linear(config.hidden_size, config.n_experts, bias=False)

    def forward(self, hidden_states):
        router_logits = self.layer(hidden_states)
        return router_logits


class AGLU(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(config.n_experts * config.ffn_size, config.hidden_size))
        self.v1 = nn.Parameter(torch.empty(config.n_experts * config.ffn_size, config.hidden_size))
        self.w2 = nn.Parameter(torch.empty(config.n_experts * config.ffn_size, config.hidden_size))
        self.act = ACT2FN[config.act]

    def forward(self, x, w1, v1, w2):
        gate = x.matmul(w1.T)
        up = x.matmul(v1.T)
        gate = self.act(gate)
        return (gate * up).matmul(w2)


class AExperts(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.mlp = AGLU(config)
        self.ffn_size = config.ffn_size
        self.hidden_size = config.hidden_size

    def forward(self, x, top_k_index, top_k_weights):
        out = torch.zeros_like(x)
        shape = (-1, self.ffn_size, self.hidden_size)
        for e in range(4):
            pos, token_idx = torch.where(top_k_index == e)
            w1 = self.mlp.w1.view(shape)[e]
            v1 = self.mlp.v1.view(shape)[e]
            w2 = self.mlp.w2.view(shape)[e]
            h = self.mlp(x[token_idx], w1, v1, w2)
            out.index_add_(0, token_idx, h * top_k_weights[token_idx, pos, None])
        return out
'''
_FLAT_BLOCK = (
    "\n\nclass AFFN(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.router = ARouter(config)\n        {experts}\n        self.top_k = config.top_k\n\n"
    "    def route(self, router_logits):\n"
    "        probs = torch.nn.functional.softmax(router_logits, dim=1)\n"
    "        top_value, indices = torch.topk(probs, self.top_k, dim=-1)\n"
    "        return top_value / torch.norm(top_value, p=2, dim=-1, keepdim=True), indices\n\n"
    "    def forward(self, hidden_states):\n"
    "        router_logits = self.router(hidden_states)\n"
    "        top_k_weights, top_k_index = self.route(router_logits)\n"
    "        return {call}\n"
)

# transformers 4.x Mixtral: the block routes inline (its own nn.Linear gate, softmax, top-k, the
# weights renormalised) and loops over a list of SwiGLU expert MLPs (porter/analysis/moe_inline.py)
_INLINE_MLP = """
class AMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))
"""
_INLINE_INIT = (
    "\n\nclass ASparseMoeBlock(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.num_experts = config.num_local_experts\n        self.top_k = config.num_experts_per_tok\n"
    "        self.gate = {gate}\n"
    "        self.experts = {experts}\n\n"
    "    def forward(self, hidden_states):\n"
)
_INLINE_FORWARD = (
    "        batch_size, sequence_length, hidden_dim = hidden_states.shape\n"
    "        hidden_states = hidden_states.view(-1, hidden_dim)\n"
    "        router_logits = self.gate(hidden_states)\n"
    "        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)\n"
    "        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)\n"
    "        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)\n"
    "        routing_weights = routing_weights.to(hidden_states.dtype)\n"
    "        final = torch.zeros((batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype)\n"
    "        expert_mask = torch.nn.functional.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)\n"
    "        for expert_idx in range(self.num_experts):\n"
    "            expert_layer = self.experts[expert_idx]\n"
    "            idx, top_x = torch.where(expert_mask[expert_idx])\n"
    "            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)\n"
    "            current = expert_layer(current_state) * routing_weights[top_x, idx, None]\n"
    "            final.index_add_(0, top_x, current.to(hidden_states.dtype))\n"
    "        final = final.reshape(batch_size, sequence_length, hidden_dim)\n"
    "        return final, router_logits\n"
)


def _routing_extras(mp) -> str:
    """The correction bias (the gate's own, or the one the block holds) and the weights' scale."""
    out = ""
    if mp.correction_bias:
        held = "gate.e_score_correction_bias" if mp.correction_bias == "gate" else mp.correction_bias
        out += f", e_score_correction_bias=self.{held}"
    if mp.routed_scaling:
        out += f", routed_scaling_factor={mp.routed_scaling}"
    return out


class FusedMoe(Rule):
    code = "PT100"
    name = "fused-moe"
    why = (
        "A mixture-of-experts block (found by dataflow: a router projecting to one logit per expert "
        "and taking top-k, whose indices and weights feed an experts module of 3-D per-expert "
        "weights summed with `index_add_`) becomes the engine's idiom: the router a `GateLinear` "
        "returning logits, the experts one `FusedMoE` that does top-k, renormalisation, the expert "
        "MLPs and the weighted sum in one kernel, its experts sharded across tensor-parallel ranks "
        "like the engine's own ports. Experts count, top-k, sizes, renormalisation and activation "
        "are read from the router and experts code (a router ranking sigmoids of the logits, "
        "routes with `scoring_func='sigmoid'`; a score-correction bias, grouped top-k and a scaled weight "
        "with the engine's grouped top-k: `e_score_correction_bias`, `num_expert_group`, `topk_group`, "
        "`routed_scaling_factor`, as read by porter/analysis/moe_router.py; experts applied as `x @ W[e]`, stored "
        "(experts, in, out), load transposed: `is_fused_checkpoint_transposed`; experts holding their weights "
        "flat in a module inside, routed by a method of the block after a router returning logits: the router "
        "stays, the method is the `custom_routing_function`, PT209); the checkpoint's per-expert names "
        "(`ckpt_names`) from transformers' conversion mapping. The router and experts classes go."
    )
    examples = [
        Example(
            "from torch import nn\n" + _ROUTER + "\n\nclass ASparseMoeBlock(nn.Module):\n"
            "    def __init__(self, config):\n        super().__init__()\n"
            "        self.gate = ATopKRouter(config)\n        self.experts = AExperts(config)\n\n"
            "    def forward(self, hidden_states):\n"
            "        _, top_k_weights, top_k_index = self.gate(hidden_states)\n"
            "        return self.experts(hidden_states, top_k_index, top_k_weights)\n",
            "from torch import nn\n" + _ROUTER + "\n\nclass ASparseMoeBlock(nn.Module):\n"
            "    def __init__(self, config):\n        super().__init__()\n"
            '        self.gate = GateLinear(config.hidden_size, config.num_local_experts, prefix=f"{prefix}.gate")\n'
            "        self.experts = FusedMoEFactory(num_experts=config.num_local_experts, "
            "top_k=config.num_experts_per_tok, hidden_size=config.hidden_size, "
            "intermediate_size=config.intermediate_size, renormalize=True, activation=config.hidden_act, "
            'quant_config=quant_config, prefix=f"{prefix}.experts")\n\n'
            "    def forward(self, hidden_states):\n"
            "        router_logits, _ = self.gate(hidden_states)\n"
            "        return self.experts(hidden_states=hidden_states, router_logits=router_logits)\n",
        ),
    ]

    examples.append(Example(  # a sigmoid router: top-k over per-expert sigmoids, no softmax
        "from torch import nn\n" + _ROUTER.replace(
            "        router_probs = torch.nn.functional.softmax(router_logits.float(), dim=-1)\n", "").replace(
            "torch.topk(router_probs, ", "torch.topk(router_logits.sigmoid(), ")
        + "\n\nclass ASparseMoeBlock(nn.Module):\n"
        "    def __init__(self, config):\n        super().__init__()\n"
        "        self.gate = ATopKRouter(config)\n        self.experts = AExperts(config)\n\n"
        "    def forward(self, hidden_states):\n"
        "        _, top_k_weights, top_k_index = self.gate(hidden_states)\n"
        "        return self.experts(hidden_states, top_k_index, top_k_weights)\n",
        "from torch import nn\n" + _ROUTER.replace(
            "        router_probs = torch.nn.functional.softmax(router_logits.float(), dim=-1)\n", "").replace(
            "torch.topk(router_probs, ", "torch.topk(router_logits.sigmoid(), ")
        + "\n\nclass ASparseMoeBlock(nn.Module):\n"
        "    def __init__(self, config):\n        super().__init__()\n"
        '        self.gate = GateLinear(config.hidden_size, config.num_local_experts, prefix=f"{prefix}.gate")\n'
        "        self.experts = FusedMoEFactory(num_experts=config.num_local_experts, "
        "top_k=config.num_experts_per_tok, hidden_size=config.hidden_size, "
        "intermediate_size=config.intermediate_size, renormalize=True, activation=config.hidden_act, "
        'quant_config=quant_config, prefix=f"{prefix}.experts", use_grouped_topk=True, num_expert_group=1, '
        "topk_group=1, scoring_func='sigmoid')\n\n"
        "    def forward(self, hidden_states):\n"
        "        router_logits, _ = self.gate(hidden_states)\n"
        "        return self.experts(hidden_states=hidden_states, router_logits=router_logits)\n",
    ))

    # experts stored (experts, in, out) and applied as `x @ W[e]` (Aria): the engine's loader
    # transposes the packed tensors; the intermediate size is the down weight's middle dimension
    examples.append(Example(
        "from torch import nn\n" + _ROUTER_T + "\n\nclass ASparseMoeBlock(nn.Module):\n"
        "    def __init__(self, config):\n        super().__init__()\n"
        "        self.gate = ATopKRouter(config)\n        self.experts = AExperts(config)\n\n"
        "    def forward(self, hidden_states):\n"
        "        _, top_k_weights, top_k_index = self.gate(hidden_states)\n"
        "        return self.experts(hidden_states, top_k_index, top_k_weights)\n",
        "from torch import nn\n" + _ROUTER_T + "\n\nclass ASparseMoeBlock(nn.Module):\n"
        "    def __init__(self, config):\n        super().__init__()\n"
        '        self.gate = GateLinear(config.hidden_size, config.num_local_experts, prefix=f"{prefix}.gate")\n'
        "        self.experts = FusedMoEFactory(num_experts=config.num_local_experts, "
        "top_k=config.num_experts_per_tok, hidden_size=config.hidden_size, "
        "intermediate_size=config.intermediate_size, renormalize=True, activation=config.hidden_act, "
        'quant_config=quant_config, prefix=f"{prefix}.experts", is_fused_checkpoint_transposed=True)\n\n'
        "    def forward(self, hidden_states):\n"
        "        router_logits, _ = self.gate(hidden_states)\n"
        "        return self.experts(hidden_states=hidden_states, router_logits=router_logits)\n",
    ))

    # gpt_oss: a router projection with a bias, softmax over its top-k logits; experts with biases
    # and the clamped SwiGLU over interleaved gate/up: the engine's swigluoai, whose constants the
    # port checks against the configuration's
    examples.append(Example("from torch import nn\n" + _OAI + _OAI_BLOCK, "from torch import nn\n" + _OAI + (
        "\n\nclass AMLP(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
        '        self.gate = GateLinear(config.hidden_size, config.num_local_experts, bias=True, prefix=f"{prefix}.gate")\n'
        "        if (config.swiglu_alpha, config.swiglu_limit) != (1.702, 7.0):\n"
        "            raise ValueError(f\"the engine's swigluoai experts compute alpha 1.702, limit 7.0, "
        "not {(config.swiglu_alpha, config.swiglu_limit)}\")\n"
        "        self.experts = FusedMoEFactory(num_experts=config.num_local_experts, top_k=config.num_experts_per_tok, "
        "hidden_size=config.hidden_size, intermediate_size=config.intermediate_size, renormalize=True, "
        'activation="swigluoai", quant_config=quant_config, prefix=f"{prefix}.experts", '
        "is_fused_checkpoint_transposed=True, has_bias=True)\n\n"
        "    def forward(self, hidden_states):\n"
        "        router_logits, _ = self.gate(hidden_states)\n"
        "        out = self.experts(hidden_states=hidden_states, router_logits=router_logits)\n"
        "        return out\n")))

    # dbrx: the router stays (its logits, under its own name), FusedMoE routes with the block's method
    examples.append(Example(
        "from torch import nn\n" + _FLAT + _FLAT_BLOCK.format(
            experts="self.experts = AExperts(config)", call="self.experts(hidden_states, top_k_index, top_k_weights)"),
        "from torch import nn\n" + _FLAT + _FLAT_BLOCK.format(
            experts="self.experts = FusedMoEFactory(num_experts=config.n_experts, top_k=config.top_k, "
            "hidden_size=config.hidden_size, intermediate_size=config.ffn_size, renormalize=False, "
            'activation=config.act, quant_config=quant_config, prefix=f"{prefix}.experts", '
            "custom_routing_function=self.route)",
            call="self.experts(hidden_states=hidden_states, router_logits=router_logits)"),
    ))

    # transformers 4.x Mixtral: the inline routing and the expert loop become the gate and FusedMoE,
    # the experts' checkpoint names their own MLP's (gate, down, up)
    examples.append(Example(
        "from torch import nn\n" + _INLINE_MLP + _INLINE_INIT.format(
            gate="nn.Linear(config.hidden_size, self.num_experts, bias=False)",
            experts="nn.ModuleList([AMLP(config) for _ in range(self.num_experts)])") + _INLINE_FORWARD,
        "from torch import nn\n" + _INLINE_MLP + _INLINE_INIT.format(
            gate='GateLinear(config.hidden_size, config.num_local_experts, prefix=f"{prefix}.gate")',
            experts="FusedMoEFactory(num_experts=config.num_local_experts, top_k=config.num_experts_per_tok, "
            "hidden_size=config.hidden_size, intermediate_size=config.intermediate_size, renormalize=True, "
            'activation=config.hidden_act, quant_config=quant_config, prefix=f"{prefix}.experts", '
            "ckpt_names=('w1', 'w2', 'w3'))")
        + "        router_logits, _ = self.gate(hidden_states)\n"
        "        hidden_states = self.experts(hidden_states=hidden_states, router_logits=router_logits)\n"
        "        return hidden_states\n",
    ))

    @classmethod
    def applies(cls, ctx) -> bool:
        return bool(ctx.plan.moes)

    @classmethod
    def classes(cls, ctx) -> set[str]:
        return {p.cls for p in ctx.plan.moes}

    def leave_Assign(self, original, updated):
        mp = self.plan.moe(self.current_class or "")
        if mp is None or len(updated.targets) != 1:
            return updated
        fn = self.current_function
        attr = self_attr(updated.targets[0].target)
        if fn == "__init__" and attr == mp.router and mp.routing_function:
            # the router stays (a GateLinear routing with its own code: PT201)
            call = updated.value
            return updated.with_changes(
                targets=[cst.AssignTarget(cst.parse_expression("self.gate"))],
                value=call.with_changes(args=[*call.args[:-1], call.args[-1].with_changes(  # type: ignore[attr-defined]
                    comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))), cst.Arg(
                    cst.parse_expression('f"{prefix}.gate"'), keyword=cst.Name("prefix"),
                    equal=cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace("")))]))
        if fn == "__init__" and attr == mp.router and not mp.route_method:
            # named `gate` as in the engine's own MoE ports (load_weights maps the checkpoint's name)
            bias = ", bias=True" if mp.router_bias else ""
            return updated.with_changes(
                targets=[cst.AssignTarget(cst.parse_expression("self.gate"))],
                value=cst.parse_expression(
                    f"{self.ctx.use('GateLinear')}({mp.hidden_size}, {mp.num_experts}{bias}, prefix=f\"{{prefix}}.gate\")"))
        if fn == "__init__" and attr == mp.experts:
            ckpt = "" if list(mp.ckpt_names) == ["gate_proj", "down_proj", "up_proj"] else \
                f", ckpt_names={tuple(mp.ckpt_names)!r}"
            if mp.scoring_func != "softmax" or mp.correction_bias or mp.n_group or mp.routed_scaling:
                # the engine's grouped top-k router: sigmoid scores, a correction bias, groups of
                # experts, a scaled weight (one group, i.e. top-k over all experts, when the
                # router has no groups: the engine's idiom for a sigmoid or biased top-k)
                ckpt = (f", use_grouped_topk=True, num_expert_group={mp.n_group or 1}, "
                        f"topk_group={mp.topk_group or 1}, scoring_func={mp.scoring_func!r}"
                        + _routing_extras(mp) + ckpt)
            if mp.transposed:
                # stored (experts, in, out): the engine's loader transposes the packed tensors
                ckpt += ", is_fused_checkpoint_transposed=True"
            if mp.routing_function and mp.route_args:  # what the block hands its router, bound
                bound = ", ".join(f"{name}={value}" for name, value in mp.route_args)
                ckpt += f", custom_routing_function={self.ctx.use('partial')}(self.gate.route, {bound})"
            elif mp.routing_function:
                ckpt += ", custom_routing_function=self.gate.route"
            elif mp.route_method:  # the block's own routing method (PT209)
                ckpt += f", custom_routing_function=self.{mp.route_method}"
            if mp.expert_bias:
                ckpt += ", has_bias=True"
            experts = updated.with_changes(value=cst.parse_expression(
                f"{self.ctx.use('FusedMoE')}(num_experts={mp.num_experts}, top_k={mp.top_k}, "
                f"hidden_size={mp.hidden_size}, intermediate_size={mp.intermediate_size}, "
                f"renormalize={mp.renormalize}, activation={mp.activation}, quant_config=quant_config, "
                f"prefix=f\"{{prefix}}.{attr}\"{ckpt})"))
            return experts
        if fn == "forward" and self_call_attr(updated.value) == mp.router and not mp.route_method:
            self._routed = {n.value for n in m.findall(original.targets[0].target, m.Name())}
            # the router returns its logits (and a bias slot): top-k happens inside FusedMoE, which
            # holds the correction bias the router was handed
            target = cst.parse_expression("router_logits, _")
            first = updated.value.args[0]  # type: ignore[attr-defined]
            if mp.route_args:  # (the bound arguments dropped: no trailing comma)
                first = first.with_changes(comma=cst.MaybeSentinel.DEFAULT)
            call = updated.value.with_changes(  # type: ignore[attr-defined]
                func=cst.parse_expression("self.gate"), args=[first])
            return updated.with_changes(targets=[cst.AssignTarget(target)], value=call)
        return updated

    def leave_FunctionDef(self, original, updated):
        mp = self.plan.moe(self.current_class or "")
        if mp is not None and mp.inline and len(self.scope) == 2 and self.current_function == "forward":
            updated = self._inline_forward(mp, original, updated)
        return super().leave_FunctionDef(original, updated)

    def _inline_forward(self, mp, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        """A block routing inline and looping over its experts (porter/analysis/moe_inline.py): its
        forward becomes the gate's logits handed to FusedMoE (which routes and sums in its kernel);
        what it returned beside its output (the router logits) every caller discards."""
        x = next(p for p in param_names(original) if p != "self")
        if any(isinstance(r.value, cst.Tuple) for r in m.findall(original, m.Return())):  # type: ignore[attr-defined]
            self.ctx.single_return.add(mp.cls)
        body = [cst.parse_statement(f"router_logits, _ = self.gate({x})"),
                cst.parse_statement(f"{x} = self.{mp.experts}(hidden_states={x}, router_logits=router_logits)"),
                cst.parse_statement(f"return {x}")]
        return updated.with_changes(body=updated.body.with_changes(body=body))

    def leave_Return(self, original, updated):
        # `return hidden_states, router_scores` (gpt_oss): what the router returned beside its
        # logits is gone (FusedMoE routes); every caller discards it, the block returns its output
        mp = self.plan.moe(self.current_class or "")
        routed = getattr(self, "_routed", set())
        if mp is None or self.current_function != "forward" or not isinstance(updated.value, cst.Tuple) \
                or len(updated.value.elements) < 2 or not all(
                    m.matches(e.value, m.Name(m.MatchIfTrue(lambda n: n in routed))) for e in updated.value.elements[1:]):
            return updated
        self.ctx.single_return.add(mp.cls)
        return updated.with_changes(value=updated.value.elements[0].value)

    def leave_SimpleStatementLine(self, original, updated):
        mp = self.plan.moe(self.current_class or "")
        if mp is None or not mp.swiglu or self.current_function != "__init__" or not m.matches(
                original, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(
                    m.Attribute(value=m.Name("self"), attr=m.Name(mp.experts)))])])):
            return updated
        # the engine's swigluoai computes with its own constants: a model with others is refused
        alpha, limit = mp.swiglu
        guard = cst.parse_statement(
            f"if ({alpha}, {limit}) != (1.702, 7.0):\n"
            f"    raise ValueError(f\"the engine's swigluoai experts compute alpha 1.702, limit 7.0, "
            f"not {{({alpha}, {limit})}}\")\n")
        return cst.FlattenSentinel([guard.with_changes(leading_lines=updated.leading_lines),
                                    updated.with_changes(leading_lines=[])])

    def leave_Call(self, original, updated):
        mp = self.plan.moe(self.current_class or "")
        if mp is None or self.current_function != "forward" or self_call_attr(updated) != mp.experts:
            return updated
        x = next((a.value for a in updated.args if a.keyword is None or a.keyword.value == "hidden_states"), None)
        if x is None:
            return updated
        return updated.with_changes(args=[
            cst.Arg(x, keyword=cst.Name("hidden_states"), equal=cst.AssignEqual(
                cst.SimpleWhitespace(""), cst.SimpleWhitespace(""))),
            cst.Arg(cst.Name(mp.router_logits if mp.route_method else "router_logits"), keyword=cst.Name("router_logits"), equal=cst.AssignEqual(
                cst.SimpleWhitespace(""), cst.SimpleWhitespace(""))),
        ])
