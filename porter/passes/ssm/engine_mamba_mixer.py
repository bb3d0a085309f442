"""PT260 engine-mamba-mixer: the rule `EngineMambaMixer`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst

from porter.analysis.cstutil import dotted, self_attr, self_call_attr
from porter.errors import PorterError
from porter.passes.base import Example, Rule

_MIXER = (
    "import torch\nfrom torch import nn\n\n\n"
    "class Mixer(nn.Module):\n"
    "    def __init__(self, config, layer_idx):\n"
    "        super().__init__()\n"
    "        self.hidden_size = config.hidden_size\n"
    "        self.num_heads = config.num_heads\n"
    "        self.head_dim = config.head_dim\n"
    "        self.n_groups = config.n_groups\n"
    "        self.state = config.state_size\n"
    "        self.intermediate_size = int(config.expand * self.hidden_size)\n"
    "        self.time_step_limit = config.time_step_limit\n"
    "        self.conv_dim = self.intermediate_size + 2 * self.n_groups * self.state\n"
    "        self.conv1d = nn.Conv1d(in_channels=self.conv_dim, out_channels=self.conv_dim, bias=True,\n"
    "                                kernel_size=config.conv_kernel, groups=self.conv_dim)\n"
    "        self.in_proj = nn.Linear(self.hidden_size, 2 * self.intermediate_size, bias=False)\n"
    "        self.A_log = nn.Parameter(torch.ones(self.num_heads))\n"
    "        self.norm = GatedNorm(self.intermediate_size, eps=config.eps)\n"
    "        self.out_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)\n"
    "\n"
    "    def forward(self, hidden_states, cache_params=None):\n"
    "        projected = self.in_proj(hidden_states)\n"
    "        A = -torch.exp(self.A_log.float())\n"
    "        gate, xbc, dt = projected.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)\n"
    "        xbc = self.conv1d(xbc)\n"
    "        x, B, C = torch.split(xbc, [self.intermediate_size, self.n_groups * self.state,\n"
    "                                    self.n_groups * self.state], dim=-1)\n"
    "        y = scan(x.view(1, 1, self.num_heads, self.head_dim), dt, A,\n"
    "                 B.view(1, 1, self.n_groups, self.state), C, D=self.D, dt_bias=self.dt_bias,\n"
    "                 dt_limit=self.time_step_limit)\n"
    "        return self.out_proj(self.norm(y, gate))\n"
    "\n"
    "\n"
)


class EngineMambaMixer(Rule):
    descend_methods = frozenset({"__init__", "forward"})
    reads_target = True  # the engine's current-config accessor is named after the engine
    code = "PT260"
    name = "engine-mamba-mixer"
    why = (
        "A Mamba-2 mixer (porter/analysis/ssm.py: a depthwise conv, one input projection split into "
        "gate, conv input and dt, `-exp(A_log)`, a gated norm, an output projection) keeps its "
        "convolution and SSM state in HF's cache object between steps. The engine's `MambaMixer2` "
        "keeps both in its own state cache, per sequence, and runs the same chunked scan and "
        "recurrent update. The builder constructs `MambaMixer2` with the sizes the HF mixer's "
        "`__init__` computes, written over the builder's config (the HF class is dropped), and "
        "calls it with the hidden states alone. Where HF's gated norm normalises the full width, "
        "a config with several groups gets the engine's norm over one group, as HF computes it. HF clamps "
        "the time step to `dt_limit`, the engine to (0, inf): a limit read from the config is checked when "
        "the port is built (another one is refused there, in one line); a limit HF computes otherwise is "
        "refused at convert."
    )
    examples = [
        Example(
            _MIXER
            + "class Block(nn.Module):\n"
            "    def __init__(self, config, layer_idx):\n"
            "        super().__init__()\n"
            "        self.mixer = Mixer(config, layer_idx=layer_idx)\n"
            "\n"
            "    def forward(self, hidden_states, cache_params=None):\n"
            "        return self.mixer(hidden_states, cache_params=cache_params)\n",
            _MIXER
            + "class Block(nn.Module):\n"
            "    def __init__(self, config, layer_idx):\n"
            "        super().__init__()\n"
            '        if tuple(config.time_step_limit) != (0.0, float("inf")):\n'
            '            raise ValueError(f"time_step_limit {config.time_step_limit}: the engine\'s MambaMixer2 clamps '
            'the time step to (0, inf) only")\n'
            "        self.mixer = MambaMixer2(hidden_size=config.hidden_size, ssm_state_size=config.state_size, "
            "conv_kernel_size=config.conv_kernel, intermediate_size=int(config.expand * config.hidden_size), "
            "use_conv_bias=True, use_bias=False, n_groups=config.n_groups, num_heads=config.num_heads, "
            'head_dim=config.head_dim, rms_norm_eps=config.eps, activation="silu", '
            "model_config=get_current_vllm_config().model_config, cache_config=cache_config, "
            'quant_config=quant_config, prefix=f"{prefix}.mixer")\n'
            "        if config.n_groups != 1:  # HF's gated norm: one group over the full width\n"
            "            self.mixer.norm = Mixer2RMSNormGated(int(config.expand * config.hidden_size), 1, "
            "eps=config.eps)\n"
            "\n"
            "    def forward(self, hidden_states, cache_params=None):\n"
            "        return self.mixer(hidden_states)\n",
        ),
    ]

    @classmethod
    def applies(cls, ctx) -> bool:
        return any(p.kind == "mamba2" for p in ctx.plan.ssm)

    def _mixer(self, attr: str | None):
        return next((p for p in self.plan.ssm if p.kind == "mamba2" and p.host == self.current_class
                     and p.attr == attr), None)

    def leave_SimpleStatementLine(self, original, updated):
        if self.current_function != "__init__" or len(updated.body) != 1 or not isinstance(updated.body[0], cst.Assign):
            return updated
        assign = updated.body[0]
        p = self._mixer(self_attr(assign.targets[0].target))
        if p is None or not isinstance(assign.value, cst.Call) or dotted(assign.value.func) != p.cls:
            return updated
        guard = self._dt_limit_guard(p)
        args = ", ".join(f"{k}={v}" for k, v in p.args.items())
        call = (f"{self.ctx.use('MambaMixer2')}({args}, "
                f"model_config={self.ctx.use('get_current_engine_config')}().model_config, "
                f'cache_config=cache_config, quant_config=quant_config, prefix=f"{{prefix}}.{p.attr}")')
        new = updated.with_changes(body=[assign.with_changes(value=cst.parse_expression(call))])
        lines = [*guard, new]
        if p.norm_full_width:
            lines.append(cst.parse_statement(
                f"if {p.args['n_groups']} != 1:  # HF's gated norm: one group over the full width\n"
                f"    self.{p.attr}.norm = {self.ctx.use('Mixer2RMSNormGated')}({p.args['intermediate_size']}, 1, "
                f"eps={p.args['rms_norm_eps']})\n"))
        return cst.FlattenSentinel(lines) if len(lines) > 1 else new

    def _dt_limit_guard(self, p) -> list[cst.BaseStatement]:
        """HF clamps the time step to `dt_limit`; the engine's MambaMixer2 to (0, inf) only. A limit
        read from the config as one attribute: the port refuses, when it is built, a config that sets
        another; a limit HF computes (a floor of `config.time_step_min`): refused here."""
        if p.dt_limit is None:
            return []
        limit = cst.parse_expression(p.dt_limit)
        if not (isinstance(limit, cst.Attribute) and isinstance(limit.value, cst.Name)):
            raise PorterError(
                f"Mamba-2 mixer clamps its time step to {p.dt_limit} (HF's dt_limit): the engine's MambaMixer2 "
                "clamps it to (0, inf) only, and no rule carries another bound", file=self.ctx.idx.path,
                line=p.line, construct=f"class {p.cls}", rule=self.name)
        attr = limit.attr.value
        return [cst.parse_statement(
            f'if tuple({p.dt_limit}) != (0.0, float("inf")):\n'
            f'    raise ValueError(f"{attr} {{{p.dt_limit}}}: the engine\'s MambaMixer2 clamps the time step to '
            f'(0, inf) only")\n')]

    def leave_Call(self, original, updated):
        if self.current_function != "forward" or self._mixer(self_call_attr(updated)) is None:
            return updated
        first = next((a for a in updated.args if a.keyword is None and not a.star), None) \
            or next((a for a in updated.args if a.keyword is not None and a.keyword.value == "hidden_states"), None)
        if first is None:
            return updated
        return updated.with_changes(args=[first.with_changes(keyword=None, equal=cst.MaybeSentinel.DEFAULT,
                                                             comma=cst.MaybeSentinel.DEFAULT)])
