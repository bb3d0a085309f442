"""PT027 engine-norms: the rule `EngineNorms`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst

import libcst.matchers as m

from porter.analysis.cstutil import code, dotted, findall
from porter.passes.base import Example, Rule


class EngineNorms(Rule):
    descend_methods = frozenset({"__init__"})
    code = "PT027"
    name = "engine-norms"
    why = (
        "RMSNorm classes (recognised by their forward: `x * rsqrt(mean(x^2) + eps)`, and `(1 + w)` "
        "for the zero-centred kind) and `nn.LayerNorm` become the engine's `RMSNorm` / "
        "`GemmaRMSNorm` / `LayerNorm`, which have the same parameters and fused kernels. The forward "
        "is read with the methods of its own it calls (Gemma's `self._norm(x.float())`); a width the "
        "file's norm takes by another keyword (`dim=`) is passed as the engine's `hidden_size`, the flag "
        "it builds its weight under (`with_scale=`) as the engine's `has_weight`."
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
        # Gemma's norm computes in a method of its own and takes its width as `dim`
        Example(
            "from torch import nn\n\n\nclass ARMSNorm(nn.Module):\n    def __init__(self, dim, eps=1e-6):\n"
            "        super().__init__()\n\n    def _norm(self, x):\n"
            "        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)\n\n"
            "    def forward(self, x):\n        return self._norm(x.float()) * (1.0 + self.weight.float())\n\n\n"
            "class ALayer(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.q_norm = ARMSNorm(dim=config.head_dim, eps=config.rms_norm_eps)\n",
            "from torch import nn\n\n\nclass ARMSNorm(nn.Module):\n    def __init__(self, dim, eps=1e-6):\n"
            "        super().__init__()\n\n    def _norm(self, x):\n"
            "        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)\n\n"
            "    def forward(self, x):\n        return self._norm(x.float()) * (1.0 + self.weight.float())\n\n\n"
            "class ALayer(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.q_norm = GemmaRMSNorm(hidden_size=config.head_dim, eps=config.rms_norm_eps)\n",
        ),
        # a norm that builds its weight only under a flag (Gemma 4's value norm: `with_scale=False`)
        Example(
            "from torch import nn\n\n\nclass ARMSNorm(nn.Module):\n"
            "    def __init__(self, hidden_size, eps=1e-6, with_scale=True):\n"
            "        super().__init__()\n        self.eps = eps\n        self.with_scale = with_scale\n"
            "        if self.with_scale:\n            self.weight = nn.Parameter(torch.ones(hidden_size))\n\n"
            "    def forward(self, x):\n        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)\n"
            "        if self.with_scale:\n            out = out * self.weight\n        return out\n\n\n"
            "class ALayer(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.v_norm = ARMSNorm(config.head_dim, eps=config.rms_norm_eps, with_scale=False)\n",
            "from torch import nn\n\n\nclass ARMSNorm(nn.Module):\n"
            "    def __init__(self, hidden_size, eps=1e-6, with_scale=True):\n"
            "        super().__init__()\n        self.eps = eps\n        self.with_scale = with_scale\n"
            "        if self.with_scale:\n            self.weight = nn.Parameter(torch.ones(hidden_size))\n\n"
            "    def forward(self, x):\n        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)\n"
            "        if self.with_scale:\n            out = out * self.weight\n        return out\n\n\n"
            "class ALayer(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.v_norm = RMSNorm(config.head_dim, eps=config.rms_norm_eps, has_weight=False)\n",
        ),
    ]

    def leave_Call(self, original, updated):
        if not self.kept(self.current_class) or self.current_function != "__init__":
            return updated
        name = dotted(updated.func) or ""
        if name in self.plan.norms:
            call = self._weight_keyword(name, self._size_keyword(name, self._eps_keyword(name, updated)))
            return call.with_changes(func=cst.Name(self.ctx.use(self.plan.norms[name])))
        if self.ctx.idx.qualify(name) == "torch.nn.LayerNorm":
            return updated.with_changes(func=cst.Name(self.ctx.use("LayerNorm")))
        return updated

    def _size_keyword(self, name: str, call: cst.Call) -> cst.Call:
        """The width passed by the file's own keyword (Gemma-3's `Gemma3RMSNorm(dim=config.head_dim)`):
        the engine's norms call their first argument `hidden_size`."""
        init = self.ctx.idx.classes[name].method("__init__") if name in self.ctx.idx.classes else None
        first = init.params.params[1].name.value if init is not None and len(init.params.params) > 1 else None
        if first is None or first == "hidden_size":
            return call
        return call.with_changes(args=[a.with_changes(keyword=cst.Name("hidden_size"))
                                       if a.keyword is not None and a.keyword.value == first else a for a in call.args])

    def _weight_keyword(self, name: str, call: cst.Call) -> cst.Call:
        """The flag the file's norm builds its weight under (Gemma 4's `with_scale`: `if self.with_scale:
        self.weight = ...`, the forward scaling only then) is the engine's `has_weight`."""
        init = self.ctx.idx.classes[name].method("__init__") if name in self.ctx.idx.classes else None
        if init is None:
            return call
        params = {p.name.value for p in init.params.params}
        copies = {a.targets[0].target.attr.value: a.value.value  # type: ignore[attr-defined]
                  for a in findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))],
                                                  value=m.Name())) if a.value.value in params}  # type: ignore[attr-defined]
        weight = m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self"), attr=m.Name("weight")))])
        for test in (st.test for st in findall(init, m.If()) if findall(st.body, weight)):  # type: ignore[attr-defined]
            flag = test.value if isinstance(test, cst.Name) else copies.get(test.attr.value) \
                if m.matches(test, m.Attribute(value=m.Name("self"))) else None  # type: ignore[attr-defined]
            if flag in params:
                return call.with_changes(args=[a.with_changes(keyword=cst.Name("has_weight"))
                                               if a.keyword is not None and a.keyword.value == flag else a
                                               for a in call.args])
        return call

    def _eps_keyword(self, name: str, call: cst.Call) -> cst.Call:
        """The file's norm names its epsilon otherwise (`RMSNorm(h, epsilon=...)`, Baichuan2): the
        keyword that sets the attribute its forward adds to the variance becomes the engine's `eps`;
        its default, when the call passes none and it is not the engine's 1e-6, is passed."""
        info = self.ctx.idx.classes.get(name)
        init, fwd = (info.method("__init__"), info.method("forward")) if info is not None else (None, None)
        if init is None or fwd is None:
            return call
        added = {code(n) for add in findall(fwd, m.BinaryOperation(operator=m.Add())) for n in (add.left, add.right)}  # type: ignore[attr-defined]
        params = {p.name.value: p for p in init.params.params}
        for a in findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))], value=m.Name())):
            param = a.value.value  # type: ignore[attr-defined]
            if code(a.targets[0].target) not in added or param not in params or param == "eps":  # type: ignore[attr-defined]
                continue
            args = list(call.args)
            for i, arg in enumerate(args):
                if arg.keyword is not None and arg.keyword.value == param:
                    args[i] = arg.with_changes(keyword=cst.Name("eps"))
                    return call.with_changes(args=args)
            index = [p.name.value for p in init.params.params].index(param) - 1  # (self)
            default = params[param].default
            if len([x for x in args if x.keyword is None]) <= index and default is not None \
                    and code(default) not in ("1e-6", "1e-06"):
                return call.with_changes(args=[*args, cst.Arg(default, keyword=cst.Name("eps"))])
            return call
        return call
