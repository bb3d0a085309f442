"""Rules on the model's structure: outputs, positions threading, constructor plumbing, the causal LM."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import assigned_names, dotted, loop_module, param_names, self_attr
from porter.passes.base import Example, Rule


class UnwrapOutputs(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT030"
    name = "unwrap-outputs"
    why = (
        "HF modules return output dataclasses (`BaseModelOutputWithPast(last_hidden_state=h, ...)`); "
        "engine modules return the hidden-states tensor itself. `return X(last_hidden_state=h, ...)` "
        "becomes `return h`, and `out.last_hidden_state` becomes `out`."
    )
    examples = [
        Example(
            "class A(nn.Module):\n    def forward(self, x):\n        out = self.m(x)\n"
            "        return Out(last_hidden_state=out.last_hidden_state, past_key_values=None)\n",
            "class A(nn.Module):\n    def forward(self, x):\n        out = self.m(x)\n        return out\n",
        )
    ]

    def leave_Return(self, original, updated):
        if not self.kept(self.current_class) or not isinstance(updated.value, cst.Call):
            return updated
        field = self.ctx.table.output_field
        for arg in updated.value.args:
            if arg.keyword is not None and arg.keyword.value == field:
                return updated.with_changes(value=arg.value)
        return updated

    def leave_Attribute(self, original, updated):
        if self.kept(self.current_class) and updated.attr.value == self.ctx.table.output_field:
            return updated.value
        return updated


class ThreadPositions(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT031"
    name = "thread-positions"
    why = (
        "The engine's rotary embedding needs `positions` where attention runs, and HF passed "
        "cos/sin instead. Every module on the path from the base model down to a module that "
        "reads `positions` gets a `positions` parameter and passes it on (`positions=positions`), "
        "found by following sub-module calls (including `for layer in self.layers`)."
    )
    examples = [
        Example(
            "from torch import nn\n\n\nclass Attn(nn.Module):\n    def forward(self, x, positions):\n        return x\n\n\nclass Layer(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n        self.self_attn = Attn(config)\n\n    def forward(self, x, scale=1.0):\n        return self.self_attn(x) * scale\n\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n        self.layers = nn.ModuleList([Layer(config) for _ in range(2)])\n\n    def forward(self, x, positions):\n        for layer in self.layers:\n            x = layer(x)\n        return x\n",
            "from torch import nn\n\n\nclass Attn(nn.Module):\n    def forward(self, x, positions):\n        return x\n\n\nclass Layer(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n        self.self_attn = Attn(config)\n\n    def forward(self, x, positions: torch.Tensor, scale=1.0):\n        return self.self_attn(x, positions=positions) * scale\n\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n        self.layers = nn.ModuleList([Layer(config) for _ in range(2)])\n\n    def forward(self, x, positions):\n        for layer in self.layers:\n            x = layer(x, positions=positions)\n        return x\n",
            seed={"needs_positions": {"Attn"}},
        )
    ]

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self._needs = self._closure()

    def _callee_classes(self, cls: str) -> dict[str, str]:
        info = self.ctx.idx.classes.get(cls)
        return {a: s.ctor for a, s in info.submodules.items()} if info else {}

    def _closure(self) -> set[str]:
        needs = set(self.ctx.needs_positions)
        changed = True
        while changed:
            changed = False
            for cls in self.plan.classes:
                if cls in needs:
                    continue
                if any(c in needs for c in self._callee_classes(cls).values()):
                    needs.add(cls)
                    changed = True
        return needs

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        if cls not in self._needs or len(self.scope) != 1 or updated.name.value != "forward":
            return updated
        if "positions" in param_names(updated):
            return updated
        params = list(updated.params.params)
        # after the required parameters: positional callers keep working, callers pass positions=
        at = next((i for i, p in enumerate(params) if p.default is not None), len(params))
        params.insert(
            at,
            cst.Param(
                cst.Name("positions"),
                annotation=cst.Annotation(cst.parse_expression("torch.Tensor")),
            ),
        )
        params = [p.with_changes(comma=cst.MaybeSentinel.DEFAULT) for p in params]
        self.mark(f"{cls}.forward")
        return updated.with_changes(params=updated.params.with_changes(params=params))

    def visit_For(self, node: cst.For) -> None:
        bound = loop_module(node)
        if bound:
            self._loop_vars = getattr(self, "_loop_vars", {})
            self._loop_vars[bound[0]] = bound[1]

    def leave_Call(self, original, updated):
        cls = self.current_class
        if cls not in self._needs or self.current_function != "forward":
            return updated
        callees = self._callee_classes(cls)
        attr = self_attr(updated.func)
        if attr is None and isinstance(updated.func, cst.Name):
            attr = getattr(self, "_loop_vars", {}).get(updated.func.value)
        if attr is None or callees.get(attr) not in self._needs:
            return updated
        if any(a.keyword is not None and a.keyword.value == "positions" for a in updated.args):
            return updated
        args = [a.with_changes(comma=cst.MaybeSentinel.DEFAULT) for a in updated.args]
        args.append(
            cst.Arg(
                cst.Name("positions"),
                keyword=cst.Name("positions"),
                equal=cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace("")),
            )
        )
        return updated.with_changes(args=args)


class FixCallArity(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT032"
    name = "fix-call-arity"
    why = (
        "A sub-module whose forward returned `(output, attn_weights)` now returns the output "
        "alone (weights were HF-only), so callers that unpacked `h, _ = self.self_attn(...)` "
        "bind `h = self.self_attn(...)`."
    )
    examples = [
        Example(
            "class Layer(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n        self.self_attn = Attn(config)\n\n    def forward(self, x):\n        h, _ = self.self_attn(x)\n        return h\n",
            "class Layer(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n        self.self_attn = Attn(config)\n\n    def forward(self, x):\n        h = self.self_attn(x)\n        return h\n",
            seed={"single_return": {"Attn"}},
        )
    ]

    def visit_FunctionDef(self, node):
        self._single: set[str] = set()
        self._loop_vars: dict[str, str] = {}
        return super().visit_FunctionDef(node)

    def visit_For(self, node: cst.For) -> None:
        bound = loop_module(node)
        if bound:
            self._loop_vars[bound[0]] = bound[1]

    def leave_Assign(self, original, updated):
        cls = self.current_class
        info = self.ctx.idx.classes.get(cls or "")
        if not info or not isinstance(updated.value, cst.Call) or len(updated.targets) != 1:
            return updated
        attr = self_attr(updated.value.func)
        if attr is None and isinstance(updated.value.func, cst.Name):
            attr = self._loop_vars.get(updated.value.func.value)  # `for layer in self.layers: out = layer(h)`
        sub = info.submodules.get(attr or "")
        target = updated.targets[0].target
        if sub and sub.ctor in self.ctx.single_return and isinstance(target, cst.Tuple):
            names = [n for el in target.elements for n in assigned_names(el.value)]
            return updated.with_changes(targets=[cst.AssignTarget(cst.Name(names[0]))])
        if sub and sub.ctor in self.ctx.single_return and isinstance(target, cst.Name):
            self._single.add(target.value)  # `outputs = layer(h); h = outputs[0]`
        return updated

    def leave_Subscript(self, original, updated):
        if m.matches(updated, m.Subscript(value=m.Name(), slice=[m.SubscriptElement(m.Index(m.Integer("0")))])) \
                and updated.value.value in getattr(self, "_single", ()):  # type: ignore[attr-defined]
            return updated.value
        return updated


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
        if isinstance(value, cst.Call) and dotted(value.func) in self._needs:
            pfx = f'maybe_prefix(prefix, "{attr}")' if top else f'f"{{prefix}}.{attr}"'
            if top:
                self.ctx.use("maybe_prefix")
            return updated.with_changes(value=self._with_kwargs(value, pfx))
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


class MatchCalleeParams(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT033"
    name = "match-callee-params"
    why = (
        "HF modules forward `**kwargs` and pass `position_ids=` to sub-modules that never read "
        "them. Once signatures are stripped, a keyword argument the called module's forward does "
        "not accept would fail at run time: it is dropped from the call."
    )
    examples = [
        Example(
            "from torch import nn\n\n\nclass MLP(nn.Module):\n    def forward(self, x):\n"
            "        return x\n\n\nclass Layer(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.mlp = MLP(config)\n\n"
            "    def forward(self, x, positions):\n"
            "        return self.mlp(x, positions=positions)\n",
            "from torch import nn\n\n\nclass MLP(nn.Module):\n    def forward(self, x):\n"
            "        return x\n\n\nclass Layer(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.mlp = MLP(config)\n\n"
            "    def forward(self, x, positions):\n        return self.mlp(x)\n",
        ),
        Example(
            "from torch import nn\n\n\nclass Layer(nn.Module):\n"
            "    def forward(self, x, positions):\n        return x\n\n\n"
            "class AModel(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.layers = nn.ModuleList([Layer(config) for _ in "
            "range(config.num_hidden_layers)])\n\n    def forward(self, x, positions):\n"
            "        for layer in self.layers:\n"
            "            x = layer(x, positions=positions, use_cache=True)\n        return x\n",
            "from torch import nn\n\n\nclass Layer(nn.Module):\n"
            "    def forward(self, x, positions):\n        return x\n\n\n"
            "class AModel(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.layers = nn.ModuleList([Layer(config) for _ in "
            "range(config.num_hidden_layers)])\n\n    def forward(self, x, positions):\n"
            "        for layer in self.layers:\n            x = layer(x, positions=positions)\n"
            "        return x\n",
        ),
    ]

    def visit_Module(self, node: cst.Module) -> None:
        self._accepts: dict[str, set[str] | None] = {}
        for st in node.body:
            if isinstance(st, cst.ClassDef):
                for item in st.body.body:
                    if isinstance(item, cst.FunctionDef) and item.name.value == "forward":
                        star = item.params.star_kwarg is not None
                        self._accepts[st.name.value] = None if star else set(param_names(item))
        self._loop_vars: dict[str, str] = {}

    def visit_For(self, node: cst.For) -> None:
        bound = loop_module(node)
        if bound:
            self._loop_vars[bound[0]] = bound[1]

    def leave_Call(self, original, updated):
        info = self.ctx.idx.classes.get(self.current_class or "")
        if not info or self.current_function == "__init__":
            return updated
        attr = self_attr(updated.func)
        if attr is None and isinstance(updated.func, cst.Name):
            attr = self._loop_vars.get(updated.func.value)
        sub = info.submodules.get(attr or "")
        mp = self.plan.moe(info.name)
        if mp is not None and attr in (mp.router, mp.experts):
            return updated  # now the engine's GateLinear / FusedMoE, not the HF class
        accepts = self._accepts.get(sub.ctor) if sub else None
        if accepts is None:
            return updated
        args = [a for a in updated.args if a.keyword is None or a.keyword.value in accepts]
        if len(args) == len(updated.args):
            return updated
        if args:
            args[-1] = args[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
        return updated.with_changes(args=args)
