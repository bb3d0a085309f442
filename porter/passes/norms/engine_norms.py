"""PT027 engine-norms: the rule `EngineNorms`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst

from porter.analysis.cstutil import dotted
from porter.passes.base import Example, Rule


class EngineNorms(Rule):
    descend_methods = frozenset({"__init__"})
    code = "PT027"
    name = "engine-norms"
    why = (
        "RMSNorm classes (recognised by their forward: `x * rsqrt(mean(x^2) + eps)`, and `(1 + w)` "
        "for the zero-centred kind) and `nn.LayerNorm` become the engine's `RMSNorm` / "
        "`GemmaRMSNorm` / `LayerNorm`, which have the same parameters and fused kernels."
    )
    examples = [
        Example(
            "from torch import nn\n\n\nclass ARMSNorm(nn.Module):\n    def forward(self, x):\n"
            "        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, "
            "keepdim=True) + self.eps)\n\n\nclass ALayer(nn.Module):\n"
            "    def __init__(self, config):\n        super().__init__()\n"
            "        self.input_layernorm = ARMSNorm(config.hidden_size, "
            "eps=config.rms_norm_eps)\n"
            "        self.final_layer_norm = nn.LayerNorm(config.hidden_size)\n",
            "from torch import nn\n\n\nclass ARMSNorm(nn.Module):\n    def forward(self, x):\n"
            "        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, "
            "keepdim=True) + self.eps)\n\n\nclass ALayer(nn.Module):\n"
            "    def __init__(self, config):\n        super().__init__()\n"
            "        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)\n"
            "        self.final_layer_norm = LayerNorm(config.hidden_size)\n",
        ),
        Example(
            "from torch import nn\n\n\nclass ARMSNorm(nn.Module):\n    def forward(self, x):\n"
            "        return x * torch.rsqrt(x.pow(2).mean(-1, "
            "keepdim=True) + self.eps) * (1.0 + self.weight)\n\n\nclass ALayer(nn.Module):\n"
            "    def __init__(self, config):\n        super().__init__()\n"
            "        self.input_layernorm = ARMSNorm(config.hidden_size, "
            "eps=config.rms_norm_eps)\n",
            "from torch import nn\n\n\nclass ARMSNorm(nn.Module):\n    def forward(self, x):\n"
            "        return x * torch.rsqrt(x.pow(2).mean(-1, "
            "keepdim=True) + self.eps) * (1.0 + self.weight)\n\n\nclass ALayer(nn.Module):\n"
            "    def __init__(self, config):\n        super().__init__()\n"
            "        self.input_layernorm = GemmaRMSNorm(config.hidden_size, "
            "eps=config.rms_norm_eps)\n",
        ),
    ]

    def leave_Call(self, original, updated):
        if not self.kept(self.current_class) or self.current_function != "__init__":
            return updated
        name = dotted(updated.func) or ""
        if name in self.plan.norms:
            return updated.with_changes(func=cst.Name(self.ctx.use(self.plan.norms[name])))
        if self.ctx.idx.qualify(name) == "torch.nn.LayerNorm":
            return updated.with_changes(func=cst.Name(self.ctx.use("LayerNorm")))
        return updated
