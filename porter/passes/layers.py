"""Rules that swap torch layers for the engine's tensor-parallel ones."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, dotted, self_attr, self_call_attr
from porter.plan import linear_args, table_activation_class
from porter.passes.base import Example, Rule

LINEAR_CLASS = {"column": "ColumnParallelLinear", "row": "RowParallelLinear", "replicated": "ReplicatedLinear"}


def _assign_attr(st: cst.CSTNode) -> str | None:
    if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(
            target=m.Attribute(value=m.Name("self"), attr=m.Name()))])])):
        return st.body[0].targets[0].target.attr.value  # type: ignore[attr-defined]
    return None


class FuseGateUp(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT024"
    name = "fuse-gate-up"
    why = (
        "A gated MLP `down(act(gate(x)) * up(x))` becomes one `MergedColumnParallelLinear` "
        "(`gate_up_proj`, checkpoint shards 0 and 1) and the engine's fused act-and-mul kernel: "
        "`down(act_and_mul(gate_up(x)))`. Found by the expression's shape (an activation of one "
        "column projection times another of the same input), not by names."
    )
    examples = [
        Example(
            "from torch import nn\n\n\nclass MLP(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, "
            "bias=False)\n"
            "        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, "
            "bias=False)\n"
            "        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, "
            "bias=False)\n        self.act_fn = ACT2FN[config.hidden_act]\n\n"
            "    def forward(self, x):\n"
            "        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\n",
            "from torch import nn\n\n\nclass MLP(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, "
            "[config.intermediate_size] * 2, bias=False, quant_config=quant_config, "
            'prefix=f"{prefix}.gate_up_proj")\n'
            "        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, "
            "bias=False)\n        self.act_fn = get_act_and_mul_fn(config.hidden_act)\n\n"
            "    def forward(self, x):\n"
            "        return self.down_proj(self.act_fn(self.gate_up_proj(x)[0]))\n",
        ),
    ]

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        gu = self.plan.gate_up(cls or "")
        if not gu or len(self.scope) != 1 or updated.name.value != "__init__":
            return updated
        info = self.ctx.idx.classes[gu.cls]
        in_f, out_f, bias = linear_args(info.submodules[gu.gate].call)
        body = []
        for st in updated.body.body:
            attr = _assign_attr(st)
            if attr == gu.gate:
                body.append(cst.parse_statement(
                    f"self.gate_up_proj = {self.ctx.use('MergedColumnParallelLinear')}({in_f}, [{out_f}] * 2, "
                    f"bias={bias}, quant_config=quant_config, prefix=f\"{{prefix}}.gate_up_proj\")\n"))
                continue
            if attr == gu.up:
                continue
            if attr == gu.act:
                value = st.body[0].value  # type: ignore[attr-defined]
                if m.matches(value, m.Subscript(value=m.Name("ACT2FN"))):
                    key = code(value.slice[0].slice.value)
                    body.append(cst.parse_statement(
                        f"self.{gu.act} = {self.ctx.use('get_act_and_mul_fn')}({key})\n"))
                    continue
                raise self.ctx.idx.error("gated MLP activation is not ACT2FN[...]",
                                         construct=f"{gu.cls}.__init__", rule=self.name)
            body.append(st)
        self.mark(f"{cls}.__init__")
        return updated.with_changes(body=updated.body.with_changes(body=body))

    def leave_BinaryOperation(self, original, updated):
        gu = self.plan.gate_up(self.current_class or "")
        if not gu or self.current_function != "forward" or not isinstance(updated.operator, cst.Multiply):
            return updated
        for act_side, up_side in ((updated.left, updated.right), (updated.right, updated.left)):
            if (self_call_attr(act_side) == gu.act and self_call_attr(up_side) == gu.up
                    and self_call_attr(act_side.args[0].value) == gu.gate):  # type: ignore[attr-defined]
                x = up_side.args[0].value  # type: ignore[attr-defined]
                inner = cst.Subscript(
                    value=cst.Call(func=cst.parse_expression("self.gate_up_proj"), args=[cst.Arg(x)]),
                    slice=[cst.SubscriptElement(cst.Index(cst.Integer("0")))],
                )
                return cst.Call(func=cst.parse_expression(f"self.{gu.act}"), args=[cst.Arg(inner)])
        return updated


class TpLinears(Rule):
    code = "PT025"
    name = "tp-linears"
    why = (
        "Each remaining `nn.Linear` gets the engine's parallel layer by its role in the dataflow: "
        "a projection whose output feeds another projection is column-parallel, the one reading "
        "it is row-parallel (all-reduce after), a stand-alone one is replicated. A column "
        "projection whose output forward chunks into n equal parts (`self.Wi(x).chunk(2)`, or through "
        "a local) is a `MergedColumnParallelLinear` of n equal outputs, so each rank holds its slice of "
        "every part and the chunk still splits them. Engine linears "
        "return `(output, bias)`: call sites unpack `y, _ = self.proj(x)` or take `[0]`."
    )
    examples = [
        Example(
            "from torch import nn\n\n\nclass MLP(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.fc1 = nn.Linear(config.hidden_size, config.ffn_dim)\n"
            "        self.fc2 = nn.Linear(config.ffn_dim, config.hidden_size, bias=False)\n\n"
            "    def forward(self, x):\n        h = self.fc1(x)\n"
            "        return self.fc2(torch.relu(h))\n",
            "from torch import nn\n\n\nclass MLP(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.fc1 = ColumnParallelLinear(config.hidden_size, config.ffn_dim, "
            'bias=True, quant_config=quant_config, prefix=f"{prefix}.fc1")\n'
            "        self.fc2 = RowParallelLinear(config.ffn_dim, config.hidden_size, bias=False, "
            'quant_config=quant_config, prefix=f"{prefix}.fc2")\n\n    def forward(self, x):\n'
            "        h, _ = self.fc1(x)\n        return self.fc2(torch.relu(h))[0]\n",
        ),
        Example(
            "from torch import nn\n\n\nclass Head(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.proj = nn.Linear(config.hidden_size, config.hidden_size)\n\n"
            "    def forward(self, x):\n        return self.proj(x)\n",
            "from torch import nn\n\n\nclass Head(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.proj = ReplicatedLinear(config.hidden_size, config.hidden_size, "
            'bias=True, quant_config=quant_config, prefix=f"{prefix}.proj")\n\n'
            "    def forward(self, x):\n        return self.proj(x)[0]\n",
        ),
        Example(  # one projection packing two outputs, chunked where it is called (ModernBERT's Wi)
            "from torch import nn\n\n\nclass MLP(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.Wi = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)\n"
            "        self.Wo = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)\n\n"
            "    def forward(self, x):\n        a, gate = self.Wi(x).chunk(2, dim=-1)\n"
            "        return self.Wo(torch.relu(a) * gate)\n",
            "from torch import nn\n\n\nclass MLP(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.Wi = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, "
            'bias=False, quant_config=quant_config, prefix=f"{prefix}.Wi")\n'
            "        self.Wo = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False, "
            'quant_config=quant_config, prefix=f"{prefix}.Wo")\n\n'
            "    def forward(self, x):\n        a, gate = self.Wi(x)[0].chunk(2, dim=-1)\n"
            "        return self.Wo(torch.relu(a) * gate)[0]\n",
        ),
    ]

    def _role(self, attr: str | None) -> str | None:
        if attr is None:
            return None
        role = self.plan.linear_role(self.current_class or "", attr)
        return "column" if role and role.startswith("merged:") and self.current_function != "__init__" else role

    def leave_Assign(self, original, updated):
        if not self.kept(self.current_class):
            return updated
        fn = self.current_function
        attr = self_attr(updated.targets[0].target) if len(updated.targets) == 1 else None
        role = self._role(attr)
        if fn == "__init__" and role and role.startswith("merged:") and isinstance(updated.value, cst.Call):
            # one projection packing n equal outputs (gate_up fused in the checkpoint): each rank must
            # hold its slice of every output, so chunk(n) still splits gate from up
            n = int(role.split(":")[1])
            in_f, out_f, bias = linear_args(updated.value)
            node = cst.parse_expression(out_f)
            part = f"({out_f}) // {n}"
            if isinstance(node, cst.BinaryOperation) and isinstance(node.operator, cst.Multiply) \
                    and code(node.left) == str(n):
                part = code(node.right)
            new = cst.parse_expression(
                f"{self.ctx.use('MergedColumnParallelLinear')}({in_f}, [{part}] * {n}, bias={bias}, "
                f"quant_config=quant_config, prefix=f\"{{prefix}}.{attr}\")")
            return updated.with_changes(value=new)
        if fn == "__init__" and role in LINEAR_CLASS and isinstance(updated.value, cst.Call):
            in_f, out_f, bias = linear_args(updated.value)
            new = cst.parse_expression(
                f"{self.ctx.use(LINEAR_CLASS[role])}({in_f}, {out_f}, bias={bias}, "
                f"quant_config=quant_config, prefix=f\"{{prefix}}.{attr}\")")
            return updated.with_changes(value=new)
        if fn != "__init__" and isinstance(original.value, cst.Call) and m.matches(
                updated.targets[0].target, m.Name()) and self._role(self_call_attr(original.value)) in LINEAR_CLASS:
            # y = self.proj(x)  ->  y, _ = self.proj(x)
            value = updated.value.value if isinstance(updated.value, cst.Subscript) else updated.value
            target = cst.Tuple([cst.Element(updated.targets[0].target), cst.Element(cst.Name("_"))],
                               lpar=[], rpar=[])
            return updated.with_changes(targets=[cst.AssignTarget(target)], value=value)
        return updated

    def leave_Call(self, original, updated):
        if self.current_function in (None, "__init__") or not self.kept(self.current_class):
            return updated
        if self._role(self_call_attr(updated)) in LINEAR_CLASS:
            return cst.Subscript(value=updated, slice=[cst.SubscriptElement(cst.Index(cst.Integer("0")))])
        return updated


class VocabEmbedding(Rule):
    descend_methods = frozenset({"__init__"})
    code = "PT026"
    name = "vocab-embedding"
    why = (
        "The token embedding (`nn.Embedding(config.vocab_size, ...)`) becomes "
        "`VocabParallelEmbedding`: the vocabulary is padded and split across ranks. Other "
        "embeddings (learned positions) stay replicated. `padding_idx` is a training detail."
    )
    examples = [
        Example(
            "from torch import nn\n\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, "
            "config.pad_token_id)\n"
            "        self.embed_positions = nn.Embedding(config.max_position_embeddings, "
            "config.hidden_size)\n",
            "from torch import nn\n\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, "
            'config.hidden_size, quant_config=quant_config, prefix=f"{prefix}.embed_tokens")\n'
            "        self.embed_positions = nn.Embedding(config.max_position_embeddings, "
            "config.hidden_size)\n",
        ),
    ]

    def leave_Assign(self, original, updated):
        if self.current_function != "__init__" or len(updated.targets) != 1:
            return updated
        attr = self_attr(updated.targets[0].target)
        if f"{self.current_class}.{attr}" not in self.plan.vocab_embeddings:
            return updated
        if dotted(updated.value.func) in self.plan.vocab_embedding_classes:  # type: ignore[attr-defined]
            return updated  # the subclass itself is rewritten (leave_ClassDef)
        args = [a for a in updated.value.args if a.keyword is None][:2]  # type: ignore[attr-defined]
        new = cst.parse_expression(
            f"{self.ctx.use('VocabParallelEmbedding')}({code(args[0].value)}, {code(args[1].value)}, "
            f"quant_config=quant_config, prefix=f\"{{prefix}}.{attr}\")")
        return updated.with_changes(value=new)


    def leave_ClassDef(self, original, updated):
        super().leave_ClassDef(original, updated)
        if self.scope or updated.name.value not in self.plan.vocab_embedding_classes:
            return updated
        name = self.ctx.use("VocabParallelEmbedding")
        bases = [b.with_changes(value=cst.Name(name)) if self.ctx.idx.qualify(dotted(b.value)) == "torch.nn.Embedding"
                 else b for b in updated.bases]

        class _Super(cst.CSTTransformer):
            # super().__init__(num, dim, padding_idx) -> super().__init__(num, dim)
            def leave_Call(self, o, u):
                if m.matches(u, m.Call(func=m.Attribute(value=m.Call(func=m.Name("super")), attr=m.Name("__init__")))):
                    args = [a for a in u.args if a.keyword is None][:2]
                    return u.with_changes(args=[a.with_changes(comma=cst.MaybeSentinel.DEFAULT) for a in args])
                return u

        return updated.with_changes(bases=bases, body=updated.body.visit(_Super()))


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


class EngineActivation(Rule):
    code = "PT028"
    name = "engine-activation"
    why = ("`ACT2FN[name]` is transformers' table (`get_activation(name)` looks it up); the engine's "
           "`get_act_fn(name)` gives its own kernels.")
    examples = [
        Example(
            "class A(nn.Module):\n    def __init__(self, config):\n        self.act = ACT2FN[config.act]\n",
            "class A(nn.Module):\n    def __init__(self, config):\n        self.act = get_act_fn(config.act)\n",
        ),
        Example(
            "from ...activations import get_activation\n\n\nclass A(nn.Module):\n"
            "    def __init__(self, config):\n        self.act = get_activation(config.act)\n",
            "from ...activations import get_activation\n\n\nclass A(nn.Module):\n"
            "    def __init__(self, config):\n        self.act = get_act_fn(config.act)\n",
        ),
    ]

    def leave_Subscript(self, original, updated):
        if self.kept(self.current_class) and m.matches(updated.value, m.Name("ACT2FN")):
            return cst.Call(func=cst.Name(self.ctx.use("get_act_fn")), args=[cst.Arg(updated.slice[0].slice.value)])
        return updated

    def leave_Call(self, original, updated):
        if self.kept(self.current_class) and len(updated.args) == 1 and updated.args[0].keyword is None \
                and (self.ctx.idx.qualify(dotted(updated.func)) or "").endswith("activations.get_activation"):
            return updated.with_changes(func=cst.Name(self.ctx.use("get_act_fn")))
        return updated


class EngineActivationClass(Rule):
    code = "PT140"
    name = "engine-activation-class"
    why = (
        "`ACT2CLS[\"xielu\"](...)` builds an activation with learned parameters (xIELU's alpha_p, "
        "alpha_n, and the beta/eps buffers the checkpoint carries). The key is a constant, so the "
        "class is known statically: the engine's class of the same activation (rules/targets.yaml "
        "`act_class_<key>`) takes the same arguments and holds the same parameter names, so the "
        "checkpoint loads unchanged. A key the target table does not list stays a blocker."
    )
    examples = [
        Example(
            "class A(nn.Module):\n    def __init__(self, config):\n"
            "        self.act = ACT2CLS[\"xielu\"](dtype=config.dtype)\n",
            "class A(nn.Module):\n    def __init__(self, config):\n"
            "        self.act = XIELU(dtype=config.dtype)\n",
        )
    ]
    descend_methods = frozenset({"__init__"})

    def leave_Call(self, original, updated):
        if not self.kept(self.current_class):
            return updated
        key = table_activation_class(updated.func)
        if key is None or f"act_class_{key}" not in self.ctx.target.symbols:
            return updated
        return updated.with_changes(func=cst.Name(self.ctx.use(f"act_class_{key}")))
