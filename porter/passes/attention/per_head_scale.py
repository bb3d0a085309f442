"""PT034 per-head-scale: the rule `PerHeadScale`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.passes.base import Example, Rule

_MINUS_ONE = m.UnaryOperation(operator=m.Minus(), expression=m.Integer("1"))
_SHAPE = m.Attribute(attr=m.Name("view") | m.Name("reshape"))


def _split(node: cst.BaseExpression) -> tuple[cst.BaseExpression, cst.BaseExpression] | None:
    """`x.view(*shape, -1, d)` (heads of width d split off the last dim) -> (x, d)."""
    if not m.matches(node, m.Call(func=_SHAPE)) or len(node.args) < 2:  # type: ignore[attr-defined]
        return None
    *_, heads, width = node.args  # type: ignore[attr-defined]
    if heads.star or width.star or not m.matches(heads.value, _MINUS_ONE) or m.matches(width.value, _MINUS_ONE):
        return None
    return node.func.value, width.value  # type: ignore[attr-defined]


_ATTN = (
    "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
    "        super().__init__()\n        self.head_dim = config.head_dim\n"
    "        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n"
    "        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
    "        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n\n"
    "    def forward(self, x, g):\n        shape = x.shape[:-1]\n"
    "        q = self.q_proj(x).view(*shape, -1, self.head_dim).transpose(1, 2)\n"
    "        k = self.k_proj(x).view(*shape, -1, self.head_dim).transpose(1, 2)\n"
    "        v = self.v_proj(x).view(*shape, -1, self.head_dim).transpose(1, 2)\n"
    "        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)\n"
)


class PerHeadScale(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT034"
    name = "per-head-scale"
    why = (
        "An attention output scaled per head (Laguna's gate: `(o.view(*shape, -1, head_dim) * "
        "g.unsqueeze(-1)).view(*shape, -1)`) splits the heads only around the product. The engine "
        "keeps the output flat, so the split becomes `o.unflatten(-1, (-1, head_dim))` and the merge "
        "`.flatten(-2)`: PT022, which removes HF's head views, then keeps both."
    )
    examples = [
        Example(_ATTN + "        o = (out.view(*shape, -1, self.head_dim) * g.unsqueeze(-1)).view(*shape, -1)\n"
                "        return o\n",
                _ATTN + "        o = (out.unflatten(-1, (-1, self.head_dim)) * g.unsqueeze(-1)).flatten(-2)\n"
                "        return o\n"),
        # a whole-width gate: no heads split around the product, left to PT022
        Example(_ATTN + "        return (out.view(*shape, -1) * g).view(*shape, -1)\n",
                _ATTN + "        return (out.view(*shape, -1) * g).view(*shape, -1)\n"),
    ]

    def leave_Call(self, original, updated):
        if self.current_function != "forward" or not self._in_attention():
            return updated
        if not m.matches(updated, m.Call(func=_SHAPE)) or not updated.args \
                or not m.matches(updated.args[-1].value, _MINUS_ONE) or updated.args[-1].star:
            return updated
        prod = updated.func.value
        if not isinstance(prod, cst.BinaryOperation):
            return updated
        left, right = _split(prod.left), _split(prod.right)
        if (left is None) == (right is None):
            return updated
        x, width = left or right  # type: ignore[misc]
        heads = cst.parse_expression("X.unflatten(-1, (-1, D))")
        heads = heads.with_changes(func=heads.func.with_changes(value=x), args=[  # type: ignore[attr-defined]
            heads.args[0], heads.args[1].with_changes(value=heads.args[1].value.with_changes(  # type: ignore[attr-defined]
                elements=[heads.args[1].value.elements[0],  # type: ignore[attr-defined]
                          heads.args[1].value.elements[1].with_changes(value=width)]))])  # type: ignore[attr-defined]
        prod = prod.with_changes(**({"left": heads} if left else {"right": heads}))
        self.mark()
        flat = cst.parse_expression("Y.flatten(-2)")
        return flat.with_changes(func=flat.func.with_changes(value=prod))  # type: ignore[attr-defined]

    def _in_attention(self) -> bool:
        return self.plan.attention(self.current_class or "") is not None
