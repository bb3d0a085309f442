"""PT022 flatten-heads: the rule `FlattenHeads`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import findall, self_call_attr
from porter.analysis.layouts import thirds_to_front
from porter.passes.base import Example, Rule


class FlattenHeads(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT022"
    name = "flatten-heads"
    why = (
        "The engine keeps q/k/v as `[num_tokens, heads * head_dim]` and its Attention op takes "
        "them flat. HF's `.view(bsz, len, heads, dim).transpose(1, 2)` and the matching "
        "`.reshape(...).contiguous()` on the output are removed inside attention forward. A "
        "per-head module (a q/k norm over head_dim) is called on `x.unflatten(-1, (-1, head_dim))` "
        "and flattened back, whether HF split the heads with a view at the call or earlier."
    )
    examples = [
        Example(
            "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.head_dim = config.head_dim\n"
            "        self.q_proj = nn.Linear(config.hidden_size, "
            "config.num_heads * self.head_dim)\n"
            "        self.k_proj = nn.Linear(config.hidden_size, "
            "config.num_kv_heads * self.head_dim)\n"
            "        self.v_proj = nn.Linear(config.hidden_size, "
            "config.num_kv_heads * self.head_dim)\n\n    def forward(self, x):\n"
            "        q = self.q_proj(x).view(*x.shape[:-1], -1, self.head_dim).transpose(1, 2)\n"
            "        k = self.k_proj(x).view(*x.shape[:-1], -1, self.head_dim).transpose(1, 2)\n"
            "        v = self.v_proj(x).view(*x.shape[:-1], -1, self.head_dim).transpose(1, 2)\n"
            "        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)\n"
            "        return out.reshape(*x.shape[:-1], -1).contiguous()\n",
            "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.head_dim = config.head_dim\n"
            "        self.q_proj = nn.Linear(config.hidden_size, "
            "config.num_heads * self.head_dim)\n"
            "        self.k_proj = nn.Linear(config.hidden_size, "
            "config.num_kv_heads * self.head_dim)\n"
            "        self.v_proj = nn.Linear(config.hidden_size, "
            "config.num_kv_heads * self.head_dim)\n\n    def forward(self, x):\n"
            "        q = self.q_proj(x)\n        k = self.k_proj(x)\n        v = self.v_proj(x)\n"
            "        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)\n"
            "        return out\n",
        ),
        Example(
            'from torch import nn\n'
            '\n'
            '\n'
            'class Attn(nn.Module):\n'
            '    def __init__(self, config):\n'
            '        super().__init__()\n'
            '        self.head_dim = config.head_dim\n'
            '        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)\n'
            '        self.q_norm = nn.LayerNorm(self.head_dim)\n'
            '\n'
            '    def _split_heads(self, x):\n'
            '        x = x.view(*x.shape[:-1], -1, 3, self.head_dim)\n'
            '        return x[..., 0, :], x[..., 1, :], x[..., 2, :]\n'
            '\n'
            '    def forward(self, x):\n'
            '        fused = self.qkv(x)\n'
            '        q, k, v = self._split_heads(fused)\n'
            '        q = self.q_norm(q)\n'
            '        out, _ = attention_interface(self, q, k, v, None)\n'
            '        return out\n',
            'from torch import nn\n'
            '\n'
            '\n'
            'class Attn(nn.Module):\n'
            '    def __init__(self, config):\n'
            '        super().__init__()\n'
            '        self.head_dim = config.head_dim\n'
            '        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)\n'
            '        self.q_norm = nn.LayerNorm(self.head_dim)\n'
            '\n'
            '    def _split_heads(self, x):\n'
            '        x = x.view(*x.shape[:-1], -1, 3, self.head_dim)\n'
            '        return x[..., 0, :], x[..., 1, :], x[..., 2, :]\n'
            '\n'
            '    def forward(self, x):\n'
            '        fused = self.qkv(x)\n'
            '        q, k, v = self._split_heads(fused)\n'
            '        q = self.q_norm(q.unflatten(-1, (-1, self.head_dim))).flatten(-2)\n'
            '        out, _ = attention_interface(self, q, k, v, None)\n'
            '        return out\n',
        ),
        Example(  # a per-head module applied to a head-split local: heads split around it only
            "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.head_dim = config.head_dim\n"
            "        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n"
            "        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
            "        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
            "        self.q_norm = Norm(self.head_dim)\n\n    def forward(self, x):\n"
            "        q = self.q_proj(x).view(*x.shape[:-1], -1, self.head_dim).transpose(1, 2)\n"
            "        k = self.k_proj(x).view(*x.shape[:-1], -1, self.head_dim).transpose(1, 2)\n"
            "        v = self.v_proj(x).view(*x.shape[:-1], -1, self.head_dim).transpose(1, 2)\n"
            "        q = self.q_norm(q)\n"
            "        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)\n"
            "        return out.reshape(*x.shape[:-1], -1).contiguous()\n",
            "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.head_dim = config.head_dim\n"
            "        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n"
            "        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
            "        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
            "        self.q_norm = Norm(self.head_dim)\n\n    def forward(self, x):\n"
            "        q = self.q_proj(x)\n        k = self.k_proj(x)\n        v = self.v_proj(x)\n"
            "        q = self.q_norm(q.unflatten(-1, (-1, self.head_dim))).flatten(-2)\n"
            "        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)\n"
            "        return out\n",
        ),
    ]

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool | None:
        descend = super().visit_FunctionDef(node)
        if node.name.value == "forward" and self.plan.attention(self.current_class or ""):
            # locals that hold head-split q/k/v (`q = self.q_proj(x).view(...).transpose(1, 2)`)
            self._head_locals = {
                a.targets[0].target.value  # type: ignore[attr-defined]
                for a in findall(node, m.Assign(targets=[m.AssignTarget(target=m.Name())]))
                if self._is_shape_op(a.value)  # type: ignore[attr-defined]
            }
        return descend

    def visit_Assign(self, node: cst.Assign) -> bool | None:
        # `out = out.unflatten(-1, (3, H)).unsqueeze(0).transpose(0, -2)...`: PT023 reads the whole
        # cut of the packed projection (its thirds) and replaces it
        target = node.targets[0].target if len(node.targets) == 1 else None
        return not (isinstance(target, cst.Name) and thirds_to_front(node.value, target.value))

    def leave_Call(self, original, updated):
        if not self.plan.attention(self.current_class or "") or self.current_function != "forward":
            return updated
        attr = self_call_attr(updated)
        arg = original.args[0].value if len(original.args) == 1 else None
        head_local = isinstance(arg, cst.Name) and arg.value in getattr(self, "_head_locals", ())
        if attr is not None and arg is not None and (self._is_shape_op(arg) or head_local) \
                and attr not in self._linears() \
                and attr not in self.plan.layout_helpers.get(self.current_class or "", ()) \
                and attr not in self.plan.head_norms.get(self.current_class or "", {}) \
                and not any(c == self.current_class and n == attr for c, n, _ in self.plan.gathered_norms):
            # a per-head module (q_norm over head_dim; not one over the whole width: PT242's), split
            # heads around it, keep flat outside
            return self._around_heads(updated, self._strip_shape(arg), "self.head_dim")
        if attr is not None and len(updated.args) == 1 and isinstance(original.args[0].value, cst.Name) \
                and self._per_head_norm(attr):
            # HF's tensor is already split into heads here (by a helper or an earlier view)
            head_dim = self.plan.attention(self.current_class or "").head_dim  # type: ignore[union-attr]
            return self._around_heads(updated, updated.args[0].value, head_dim)
        if self._is_shape_op(updated):
            return updated.func.value  # type: ignore[attr-defined]
        if attr is not None and updated.args and attr in self.plan.layout_helpers.get(self.current_class or "", ()):
            self._dropped_helpers.add(attr)
            return updated.args[0].value  # `self._split_heads(q, heads, dim)`: a head layout of q
        return updated

    def visit_ClassDef(self, node):
        self._dropped_helpers: set[str] = set()
        return super().visit_ClassDef(node)

    def leave_ClassDef(self, original, updated):
        dropped = getattr(self, "_dropped_helpers", set())
        if dropped and len(self.scope) == 1:
            still = {self_call_attr(c) for c in findall(updated, m.Call())}
            gone = dropped - still
            body = [st for st in updated.body.body if not (isinstance(st, cst.FunctionDef) and st.name.value in gone)]
            for name in sorted(gone):
                self.mark(f"{updated.name.value}.{name}")
            updated = updated.with_changes(body=updated.body.with_changes(body=body))
            self._dropped_helpers = set()
        return super().leave_ClassDef(original, updated)

    @staticmethod
    def _around_heads(call: cst.Call, x: cst.BaseExpression, head_dim: str) -> cst.BaseExpression:
        """`mod(x)` -> `mod(x.unflatten(-1, (-1, head_dim))).flatten(-2)`: heads split around it."""
        per_head = cst.parse_expression(f"X.unflatten(-1, (-1, {head_dim}))").with_changes(
            func=cst.Attribute(value=x, attr=cst.Name("unflatten")))
        return cst.parse_expression("Y.flatten(-2)").with_changes(func=cst.Attribute(
            value=call.with_changes(args=[cst.Arg(per_head)]), attr=cst.Name("flatten")))

    def _per_head_norm(self, attr: str) -> bool:
        """A norm sub-module of the attention applied to each head alike (one that spans the heads
        is PT120's)."""
        info = self.ctx.idx.classes.get(self.current_class or "")
        sub = info.submodules.get(attr) if info else None
        if sub is None or attr in self._linears():
            return False
        is_norm = sub.ctor in self.plan.norms or "norm" in (sub.ctor or "").lower()
        whole_width = any(c == self.current_class and n == attr for c, n, _ in self.plan.gathered_norms)
        return is_norm and not whole_width and attr not in self.plan.head_norms.get(self.current_class or "", {})

    def _linears(self) -> set[str]:
        info = self.ctx.idx.classes.get(self.current_class or "")
        return set(info.linears()) if info else set()

    @staticmethod
    def _is_shape_op(node: cst.BaseExpression) -> bool:
        return isinstance(node, cst.Call) and isinstance(node.func, cst.Attribute) and \
            node.func.attr.value in ("view", "reshape", "transpose", "contiguous", "permute")

    def _strip_shape(self, node: cst.BaseExpression) -> cst.BaseExpression:
        while self._is_shape_op(node):
            node = node.func.value  # type: ignore[attr-defined]
        return node
