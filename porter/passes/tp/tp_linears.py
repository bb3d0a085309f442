"""PT025 tp-linears: the rule `TpLinears`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, self_attr, self_call_attr
from porter.passes.base import Example, Rule
from porter.analysis.layouts import linear_args

LINEAR_CLASS = {"column": "ColumnParallelLinear", "row": "RowParallelLinear", "replicated": "ReplicatedLinear"}


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
        Example(  # a projection the config may leave out: the engine's layer in its arm
            "from torch import nn\n\n\nclass MLP(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.fc1 = nn.Linear(config.hidden_size, config.ffn_dim, bias=False) if config.fc1 else None\n"
            "        self.fc2 = nn.Linear(config.ffn_dim, config.hidden_size, bias=False)\n\n"
            "    def forward(self, x):\n        return self.fc2(torch.relu(self.fc1(x)))\n",
            "from torch import nn\n\n\nclass MLP(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.fc1 = ColumnParallelLinear(config.hidden_size, config.ffn_dim, bias=False, "
            'quant_config=quant_config, prefix=f"{prefix}.fc1") if config.fc1 else None\n'
            "        self.fc2 = RowParallelLinear(config.ffn_dim, config.hidden_size, bias=False, "
            'quant_config=quant_config, prefix=f"{prefix}.fc2")\n\n    def forward(self, x):\n'
            "        return self.fc2(torch.relu(self.fc1(x)[0]))[0]\n",
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
            return updated.with_changes(value=self._engine_linear(updated.value, role, attr))
        if fn == "__init__" and role in LINEAR_CLASS and isinstance(updated.value, cst.IfExp):
            # `nn.Linear(...) if config.flag else None`: a projection the config may leave out
            cond = updated.value
            for arm, other in (("body", cond.orelse), ("orelse", cond.body)):
                if isinstance(getattr(cond, arm), cst.Call) and m.matches(other, m.Name("None")):
                    new = self._engine_linear(getattr(cond, arm), role, attr)
                    return updated.with_changes(value=cond.with_changes(**{arm: new}))
        if fn != "__init__" and isinstance(original.value, cst.Call) and m.matches(
                updated.targets[0].target, m.Name()) and self._role(self_call_attr(original.value)) in LINEAR_CLASS:
            # y = self.proj(x)  ->  y, _ = self.proj(x)
            value = updated.value.value if isinstance(updated.value, cst.Subscript) else updated.value
            target = cst.Tuple([cst.Element(updated.targets[0].target), cst.Element(cst.Name("_"))],
                               lpar=[], rpar=[])
            return updated.with_changes(targets=[cst.AssignTarget(target)], value=value)
        return updated

    def _engine_linear(self, call: cst.Call, role: str, attr: str | None) -> cst.BaseExpression:
        in_f, out_f, bias = linear_args(call)
        return cst.parse_expression(
            f"{self.ctx.use(LINEAR_CLASS[role])}({in_f}, {out_f}, bias={bias}, "
            f"quant_config=quant_config, prefix=f\"{{prefix}}.{attr}\")")

    def leave_Call(self, original, updated):
        if self.current_function in (None, "__init__") or not self.kept(self.current_class):
            return updated
        if self._role(self_call_attr(updated)) in LINEAR_CLASS:
            return cst.Subscript(value=updated, slice=[cst.SubscriptElement(cst.Index(cst.Integer("0")))])
        return updated
