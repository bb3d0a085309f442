"""PT261 mamba-state-interface: the rule `MambaStateInterface`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst

from porter.analysis.cstutil import names_in
from porter.analysis.ssm import SsmPlan
from porter.errors import PorterError
from porter.passes.base import Example, Rule
from porter.render import render

# MambaStateShapeCalculator's keywords, per layer kind -> the engine layer's argument holding it
SHAPE_ARGS = {
    "mamba2": {"intermediate_size": "intermediate_size", "n_groups": "n_groups", "num_heads": "num_heads",
               "head_dim": "head_dim", "state_size": "ssm_state_size", "conv_kernel": "conv_kernel_size"},
    "short_conv": {"intermediate_size": "dim", "conv_kernel": "conv_kernel_size"},
}

_LM_BEFORE = (
    "class ALM(nn.Module):\n"
    "    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ''):\n"
    "        super().__init__()\n"
)


class MambaStateInterface(Rule):
    descends = False
    reads_target = True  # the engine config's keyword and class are named after the engine
    code = "PT261"
    name = "mamba-state-interface"
    why = (
        "The engine sizes and allocates a state-space layer's state cache before it builds the model, "
        "from class methods of the causal LM: `get_mamba_state_shape_from_config` (conv and SSM state "
        "shapes per TP rank, from the config), `get_mamba_state_dtype_from_config` and "
        "`get_mamba_state_copy_func` (copying a state block when a prefix is cached); and it tells such a "
        "model by its interfaces: `HasInnerState`, `IsAttentionFree` when no layer is attention, else "
        "`IsHybrid` (attention and state-space layers share the cache), and `SupportsMambaPrefixCaching`. The methods are rendered from templates/mamba_state.py.j2 with the "
        "sizes PT260 passes to the engine's layer, so the cache and the layer always agree."
    )
    examples = [
        Example(
            _LM_BEFORE,
            "class ALM(nn.Module, HasInnerState, IsAttentionFree, SupportsMambaPrefixCaching):\n"
            "    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ''):\n"
            "        super().__init__()\n"
            "    @classmethod\n"
            "    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, ...]:\n"
            "        return MambaStateDtypeCalculator.mamba2_state_dtype(\n"
            "            vllm_config.model_config.dtype,\n"
            "            vllm_config.cache_config.mamba_cache_dtype,\n"
            "            vllm_config.cache_config.mamba_ssm_cache_dtype,\n"
            "        )\n"
            "    \n    \n"
            "    @classmethod\n"
            "    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, ...], ...]:\n"
            "        config = vllm_config.model_config.hf_config\n"
            "        return MambaStateShapeCalculator.mamba2_state_shape(\n"
            "            tp_world_size=vllm_config.parallel_config.tensor_parallel_size,\n"
            "            intermediate_size=int(config.expand * config.hidden_size),\n"
            "            n_groups=config.n_groups,\n"
            "            num_heads=config.num_heads,\n"
            "            head_dim=config.head_dim,\n"
            "            state_size=config.state_size,\n"
            "            conv_kernel=config.conv_kernel,\n"
            "            num_spec=vllm_config.num_speculative_tokens,\n"
            "        )\n"
            "    \n    \n"
            "    @classmethod\n"
            "    def get_mamba_state_copy_func(cls):\n"
            "        return MambaStateCopyFuncCalculator.mamba2_state_copy_func()\n",
            seed={"causal_lm": "ALM", "ssm": [SsmPlan(
                cls="Mixer", host="Block", attr="mixer", kind="mamba2",
                args={"intermediate_size": "int(config.expand * config.hidden_size)", "n_groups": "config.n_groups",
                      "num_heads": "config.num_heads", "head_dim": "config.head_dim",
                      "ssm_state_size": "config.state_size", "conv_kernel_size": "config.conv_kernel"})]},
        ),
    ]

    @classmethod
    def applies(cls, ctx) -> bool:
        return bool(ctx.plan.ssm)

    def leave_ClassDef(self, original, updated):
        super().leave_ClassDef(original, updated)
        if self.scope or updated.name.value != self.plan.causal_lm:
            return updated
        kinds = {p.kind for p in self.plan.ssm}
        shapes = {tuple(self._shape_args(p)) for p in self.plan.ssm}
        if len(kinds) != 1 or len(shapes) != 1:
            raise PorterError("state-space layers of different kinds or sizes in one model: the engine's "
                              "state cache takes one shape per model (no rule splits it)",
                              construct=f"class {updated.name.value}", rule=self.name)
        kind, shape = kinds.pop(), shapes.pop()
        t = self.ctx.target
        methods = render("mamba_state.py.j2", cfg=t.config_kwarg, cfg_class=self.ctx.use("EngineConfig"), kind=kind,
                         shape_args=shape, dtype_calc=self.ctx.use("MambaStateDtypeCalculator"),
                         shape_calc=self.ctx.use("MambaStateShapeCalculator"),
                         copy_calc=self.ctx.use("MambaStateCopyFuncCalculator"))
        marker = "IsHybrid" if self.plan.attentions else "IsAttentionFree"
        # (the engine's own ports of Mamba-2 layers support prefix caching; of short convolutions, not)
        markers = ["HasInnerState", marker] + (["SupportsMambaPrefixCaching"] if kind == "mamba2" else [])
        bases = [*updated.bases, *(cst.Arg(cst.Name(self.ctx.use(b))) for b in markers)]
        bases = [b.with_changes(comma=cst.MaybeSentinel.DEFAULT) for b in bases]
        body = [*updated.body.body, *cst.parse_module(methods).body]
        return updated.with_changes(bases=bases, body=updated.body.with_changes(body=body))

    def _shape_args(self, p) -> list[tuple[str, str]]:
        out = [(key, p.args[src]) for key, src in SHAPE_ARGS[p.kind].items()]
        for key, value in out:
            if names_in(cst.parse_expression(value)) - {"config", "int"}:
                raise PorterError(f"the state size `{key}` depends on more than the config ({value}): the "
                                  "engine sizes its state cache from the config alone",
                                  construct=f"class {self.plan.causal_lm}", rule=self.name)
        return out
