"""PT040 thread-prefix: the rule `ThreadPrefix`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import dotted, param_names, self_attr
from porter.passes.base import Example, Rule


class ThreadPrefix(Rule):
    descend_methods = frozenset({"__init__"})
    code = "PT040"
    name = "thread-prefix"
    why = (
        "Engine layers are named by a `prefix` (`model.layers.3.self_attn.attn` must be unique per "
        "Attention; quantization looks layers up by it) and take the cache and quantization "
        "configs. Every module class that builds engine layers gains `cache_config`, "
        '`quant_config` and `prefix` parameters, and passes `prefix=f"{prefix}.<attr>"` (with the '
        "layer index inside `nn.ModuleList([...])`) to the modules it builds."
    )
    examples = [
        Example(
            "from torch import nn\n\n\nclass MLP(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.fc1 = nn.Linear(config.hidden_size, config.ffn_dim)\n"
            "        self.fc2 = nn.Linear(config.ffn_dim, config.hidden_size)\n\n"
            "    def forward(self, x):\n        return self.fc2(self.fc1(x))\n\n\n"
            "class Layer(nn.Module):\n    def __init__(self, config, layer_idx):\n"
            "        super().__init__()\n        self.mlp = MLP(config)\n\n\n"
            "class AModel(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.layers = nn.ModuleList([Layer(config, "
            "i) for i in range(config.num_hidden_layers)])\n",
            "from torch import nn\n\n\nclass MLP(nn.Module):\n"
            "    def __init__(self, config, cache_config: CacheConfig | None = None, "
            'quant_config: QuantizationConfig | None = None, prefix: str = ""):\n'
            "        super().__init__()\n"
            "        self.fc1 = nn.Linear(config.hidden_size, config.ffn_dim)\n"
            "        self.fc2 = nn.Linear(config.ffn_dim, config.hidden_size)\n\n"
            "    def forward(self, x):\n        return self.fc2(self.fc1(x))\n\n\n"
            "class Layer(nn.Module):\n"
            "    def __init__(self, config, layer_idx, cache_config: CacheConfig | None = None, "
            'quant_config: QuantizationConfig | None = None, prefix: str = ""):\n'
            "        super().__init__()\n"
            "        self.mlp = MLP(config, cache_config=cache_config, quant_config=quant_config, "
            'prefix=f"{prefix}.mlp")\n\n\nclass AModel(nn.Module):\n'
            "    def __init__(self, config, cache_config: CacheConfig | None = None, "
            'quant_config: QuantizationConfig | None = None, prefix: str = ""):\n'
            "        super().__init__()\n"
            "        self.layers = nn.ModuleList([Layer(config, i, cache_config=cache_config, "
            "quant_config=quant_config, "
            'prefix=f"{prefix}.layers.{i}") for i in range(config.num_hidden_layers)])\n',
        ),
        Example(
            "from torch import nn\n\n\nclass MLP(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.fc1 = nn.Linear(config.hidden_size, config.ffn_dim)\n"
            "        self.fc2 = nn.Linear(config.ffn_dim, config.hidden_size)\n\n"
            "    def forward(self, x):\n        return self.fc2(self.fc1(x))\n\n\n"
            "class Layer(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.mlp = MLP(config) if config.ffn_dim > 0 else None\n\n\n"
            "class AModel(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.layer = Layer(config)\n",
            "from torch import nn\n\n\nclass MLP(nn.Module):\n"
            "    def __init__(self, config, cache_config: CacheConfig | None = None, "
            'quant_config: QuantizationConfig | None = None, prefix: str = ""):\n'
            "        super().__init__()\n        self.fc1 = nn.Linear(config.hidden_size, config.ffn_dim)\n"
            "        self.fc2 = nn.Linear(config.ffn_dim, config.hidden_size)\n\n"
            "    def forward(self, x):\n        return self.fc2(self.fc1(x))\n\n\n"
            "class Layer(nn.Module):\n"
            "    def __init__(self, config, cache_config: CacheConfig | None = None, "
            'quant_config: QuantizationConfig | None = None, prefix: str = ""):\n'
            "        super().__init__()\n"
            "        self.mlp = MLP(config, cache_config=cache_config, quant_config=quant_config, "
            'prefix=f"{prefix}.mlp") if config.ffn_dim > 0 else None\n\n\nclass AModel(nn.Module):\n'
            "    def __init__(self, config, cache_config: CacheConfig | None = None, "
            'quant_config: QuantizationConfig | None = None, prefix: str = ""):\n'
            "        super().__init__()\n"
            '        self.layer = Layer(config, cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.layer")\n',
        ),
        Example(
            "from torch import nn\n\n\nclass MLP(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.fc1 = nn.Linear(config.hidden_size, config.ffn_dim)\n"
            "        self.fc2 = nn.Linear(config.ffn_dim, config.hidden_size)\n\n"
            "    def forward(self, x):\n        return self.fc2(self.fc1(x))\n\n\n"
            "class Layer(nn.Module):\n    def __init__(self, config, layer_idx):\n"
            "        super().__init__()\n        self.pre = MLP(config)\n"
            "        self.mlp = MLP(config) if layer_idx else None\n",
            "from torch import nn\n\n\nclass MLP(nn.Module):\n"
            "    def __init__(self, config, cache_config: CacheConfig | None = None, "
            'quant_config: QuantizationConfig | None = None, prefix: str = ""):\n'
            "        super().__init__()\n"
            "        self.fc1 = nn.Linear(config.hidden_size, config.ffn_dim)\n"
            "        self.fc2 = nn.Linear(config.ffn_dim, config.hidden_size)\n\n"
            "    def forward(self, x):\n        return self.fc2(self.fc1(x))\n\n\n"
            "class Layer(nn.Module):\n"
            "    def __init__(self, config, layer_idx, cache_config: CacheConfig | None = None, "
            'quant_config: QuantizationConfig | None = None, prefix: str = ""):\n'
            "        super().__init__()\n"
            "        self.pre = MLP(config, cache_config=cache_config, quant_config=quant_config, "
            'prefix=f"{prefix}.pre")\n'
            "        self.mlp = MLP(config, cache_config=cache_config, quant_config=quant_config, "
            'prefix=f"{prefix}.mlp") if layer_idx else None\n',
        ),
    ]

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self._needs = self._closure()

    def _closure(self) -> set[str]:
        idx = self.ctx.idx
        needs: set[str] = {a.cls for a in self.plan.attentions}
        needs |= {lp.cls for lp in self.plan.linears}
        needs |= {v.split(".")[0] for v in self.plan.vocab_embeddings}
        needs |= {p.cls for p in self.plan.moes}
        needs |= {a.cls for a in self.plan.latent_attentions}  # builds the engine's MLA layer (PT280)
        needs |= {p.host for p in self.plan.ssm}  # builds the engine's state-space layer (PT260)
        changed = True
        while changed:
            changed = False
            for cls in self.plan.classes:
                info = idx.classes[cls]
                if cls not in needs and any(s.ctor in needs for s in info.submodules.values()):
                    needs.add(cls)
                    changed = True
        needs.discard(self.plan.causal_lm)
        return needs

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        if cls not in self._needs or len(self.scope) != 1 or updated.name.value != "__init__":
            return updated
        extra = [
            cst.Param(
                cst.Name("cache_config"),
                annotation=cst.Annotation(
                    cst.parse_expression(f"{self.ctx.use('CacheConfig')} | None")
                ),
                default=cst.Name("None"),
            ),
            cst.Param(
                cst.Name("quant_config"),
                annotation=cst.Annotation(
                    cst.parse_expression(f"{self.ctx.use('QuantizationConfig')} | None")
                ),
                default=cst.Name("None"),
            ),
            cst.Param(
                cst.Name("prefix"),
                annotation=cst.Annotation(cst.Name("str")),
                default=cst.SimpleString('""'),
            ),
        ]
        have = set(param_names(updated))
        params = list(updated.params.params) + [p for p in extra if p.name.value not in have]
        params = [p.with_changes(comma=cst.MaybeSentinel.DEFAULT) for p in params]
        self.mark(f"{cls}.__init__")
        return updated.with_changes(params=updated.params.with_changes(params=params))

    def leave_Assign(self, original, updated):
        cls = self.current_class
        if cls is None or self.current_function != "__init__" or len(updated.targets) != 1:
            return updated
        if cls not in self._needs and cls != self.plan.causal_lm:
            return updated
        attr = self_attr(updated.targets[0].target)
        if attr is None:
            return updated
        value = updated.value
        top = cls == self.plan.causal_lm
        pfx = f'maybe_prefix(prefix, "{attr}")' if top else f'f"{{prefix}}.{attr}"'
        threaded = self._thread(value, pfx)
        if threaded is not None:
            if top:
                self.ctx.use("maybe_prefix")
            return updated.with_changes(value=threaded)
        if isinstance(value, cst.Call) and m.matches(
            value, m.Call(args=[m.Arg(m.ListComp(elt=m.Call()))])
        ):
            comp = value.args[0].value
            if dotted(comp.elt.func) in self._needs and isinstance(comp.for_in.target, cst.Name):  # type: ignore[attr-defined]
                loop = comp.for_in.target.value  # type: ignore[attr-defined]
                pfx = f'f"{{prefix}}.{attr}.{{{loop}}}"'
                new_comp = comp.with_changes(elt=self._with_kwargs(comp.elt, pfx))  # type: ignore[attr-defined]
                return updated.with_changes(
                    value=value.with_changes(args=[value.args[0].with_changes(value=new_comp)])
                )
        return updated

    def _thread(self, value: cst.BaseExpression, pfx: str) -> cst.BaseExpression | None:
        """`Mod(...)`, or either branch of `A(...) if c else B(...)`, with the engine kwargs."""
        if isinstance(value, cst.Call) and dotted(value.func) in self._needs:
            return self._with_kwargs(value, pfx)
        if isinstance(value, cst.IfExp):
            body, orelse = self._thread(value.body, pfx), self._thread(value.orelse, pfx)
            if body is not None or orelse is not None:
                return value.with_changes(body=body or value.body, orelse=orelse or value.orelse)
        return None

    def _with_kwargs(self, call: cst.Call, prefix_expr: str) -> cst.Call:
        args = [a.with_changes(comma=cst.MaybeSentinel.DEFAULT) for a in call.args]
        eq = cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace(""))
        for kw, val in (
            ("cache_config", "cache_config"),
            ("quant_config", "quant_config"),
            ("prefix", prefix_expr),
        ):
            args.append(cst.Arg(cst.parse_expression(val), keyword=cst.Name(kw), equal=eq))
        return call.with_changes(args=args)
