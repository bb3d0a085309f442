"""PT263 engine-short-conv: the rule `EngineShortConv`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst

from porter.analysis.cstutil import dotted, self_attr, self_call_attr
from porter.errors import PorterError
from porter.passes.base import Example, Rule

_CONV = (
    "import torch\nfrom torch import nn\n\n\n"
    "class ShortConvHF(nn.Module):\n"
    "    def __init__(self, config, layer_idx):\n"
    "        super().__init__()\n"
    "        self.conv = nn.Conv1d(config.hidden_size, config.hidden_size, kernel_size=config.conv_L_cache,\n"
    "                              groups=config.hidden_size, bias=config.conv_bias)\n"
    "        self.in_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.conv_bias)\n"
    "        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.conv_bias)\n"
    "\n"
    "    def forward(self, hidden_states, past_key_values=None):\n"
    "        B, C, x = self.in_proj(hidden_states).transpose(-1, -2).chunk(3, dim=-2)\n"
    "        y = C * self.conv(B * x)\n"
    "        return self.out_proj(y.transpose(-1, -2))\n"
    "\n"
    "\n"
)


class EngineShortConv(Rule):
    descend_methods = frozenset({"__init__", "forward"})
    reads_target = True  # the engine's current-config accessor is named after the engine
    code = "PT263"
    name = "engine-short-conv"
    why = (
        "A gated short convolution (porter/analysis/ssm.py: one projection chunked in B, C, x; "
        "`C * conv(B * x)` with a depthwise conv; an output projection) keeps its last inputs in HF's "
        "cache object between steps. The engine's `ShortConv` keeps them in its own state cache and "
        "computes the same; it reads the kernel size and bias from the config (`conv_L_cache`, "
        "`conv_bias`), so the port takes it only where HF's layer reads those. It writes into an output "
        "tensor it is handed: the call becomes `output = torch.empty_like(x)`, `self.conv(x, output)`."
    )
    examples = [
        Example(
            _CONV
            + "class Layer(nn.Module):\n"
            "    def __init__(self, config, layer_idx):\n"
            "        super().__init__()\n"
            "        self.conv = ShortConvHF(config, layer_idx)\n"
            "\n"
            "    def forward(self, hidden_states, past_key_values=None):\n"
            "        hidden_states = self.conv(hidden_states=self.norm(hidden_states), past_key_values=past_key_values)\n"
            "        return hidden_states\n",
            _CONV
            + "class Layer(nn.Module):\n"
            "    def __init__(self, config, layer_idx):\n"
            "        super().__init__()\n"
            "        self.conv = ShortConv(config, config.hidden_size, layer_idx, "
            "model_config=get_current_vllm_config().model_config, cache_config=cache_config, "
            'quant_config=quant_config, prefix=f"{prefix}.conv")\n'
            "\n"
            "    def forward(self, hidden_states, past_key_values=None):\n"
            "        conv_input = self.norm(hidden_states)\n"
            "        conv_output = torch.empty_like(conv_input)\n"
            "        self.conv(conv_input, conv_output)\n"
            "        hidden_states = conv_output\n"
            "        return hidden_states\n",
        ),
    ]

    @classmethod
    def applies(cls, ctx) -> bool:
        return any(p.kind == "short_conv" for p in ctx.plan.ssm)

    def _conv(self, attr: str | None):
        return next((p for p in self.plan.ssm if p.kind == "short_conv" and p.host == self.current_class
                     and p.attr == attr), None)

    def leave_SimpleStatementLine(self, original, updated):
        if len(updated.body) != 1 or not isinstance(updated.body[0], cst.Assign):
            return updated
        assign = updated.body[0]
        if self.current_function == "__init__":
            p = self._conv(self_attr(assign.targets[0].target))
            if p is None or not isinstance(assign.value, cst.Call) or dotted(assign.value.func) != p.cls:
                return updated
            self._config_reads(p)
            call = (f"{self.ctx.use('ShortConv')}({p.args['config']}, {p.args['dim']}, {p.args['layer_idx']}, "
                    f"model_config={self.ctx.use('get_current_engine_config')}().model_config, "
                    f'cache_config=cache_config, quant_config=quant_config, prefix=f"{{prefix}}.{p.attr}")')
            return updated.with_changes(body=[assign.with_changes(value=cst.parse_expression(call))])
        if self.current_function != "forward" or self._conv(self_call_attr(assign.value)) is None:
            return updated
        call = assign.value
        first = next((a for a in call.args if a.keyword is None and not a.star), None) \
            or next((a for a in call.args if a.keyword is not None and a.keyword.value == "hidden_states"), None)
        if first is None or len(assign.targets) != 1:
            return updated
        lines: list[cst.BaseStatement] = []
        x = first.value
        if not isinstance(x, cst.Name):  # computed once, as HF does
            lines.append(cst.parse_statement("conv_input = 0").with_changes(body=[cst.Assign(
                targets=[cst.AssignTarget(cst.Name("conv_input"))], value=x)]))
            x = cst.Name("conv_input")
        name = x.value
        lines.append(cst.parse_statement(f"conv_output = torch.empty_like({name})"))
        lines.append(cst.parse_statement(f"{cst.Module([]).code_for_node(call.func)}({name}, conv_output)"))
        lines.append(updated.with_changes(body=[assign.with_changes(value=cst.Name("conv_output"))]))
        return cst.FlattenSentinel(lines)

    def _config_reads(self, p) -> None:
        """The engine's ShortConv reads `config.conv_L_cache` and `config.conv_bias`: HF's layer must too."""
        cfg = p.args["config"]
        want = {"conv_kernel_size": f"{cfg}.conv_L_cache", "bias": f"{cfg}.conv_bias",
                "in_bias": f"{cfg}.conv_bias", "out_bias": f"{cfg}.conv_bias"}
        for key, expected in want.items():
            if p.args[key] != expected:
                raise PorterError(
                    f"short convolution whose {key.replace('_', ' ')} is {p.args[key]}: the engine's ShortConv "
                    f"reads it from the config as {expected}", construct=f"class {p.cls}", rule=self.name)
