"""PT034 per-head-scale: the rule `PerHeadScale`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.layouts import attention_call_names
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


def _one_per_head(node: cst.BaseExpression) -> bool:
    """A factor with a trailing axis of one (`g.unsqueeze(-1)`, `g[..., None]`): one value per head,
    broadcast over its width. A factor of the output's own shape (Beam's gate, which PT161 already
    made flat like the engine's output) multiplies element by element, flat as well as in heads."""
    if m.matches(node, m.Call(func=m.Attribute(attr=m.Name("unsqueeze")), args=[m.Arg(_MINUS_ONE)])):
        return True
    return isinstance(node, cst.Subscript) and bool(node.slice) and m.matches(
        node.slice[-1], m.SubscriptElement(m.Index(m.Name("None"))))


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
        "`.flatten(-2)`: PT022, which removes HF's head views, then keeps both. The same holds where "
        "HF scales the attention's own output while it is still split into heads (LFM3's gate: "
        "`out = out * g.unsqueeze(-1)` after the attention call, before `out.reshape(*shape, -1)`): "
        "the engine's output is flat, so `out` is split around that product too."
    )
    examples = [
        Example(_ATTN + "        o = (out.view(*shape, -1, self.head_dim) * g.unsqueeze(-1)).view(*shape, -1)\n"
                "        return o\n",
                _ATTN + "        o = (out.unflatten(-1, (-1, self.head_dim)) * g.unsqueeze(-1)).flatten(-2)\n"
                "        return o\n"),
        # a whole-width gate: no heads split around the product, left to PT022
        Example(_ATTN + "        return (out.view(*shape, -1) * g).view(*shape, -1)\n",
                _ATTN + "        return (out.view(*shape, -1) * g).view(*shape, -1)\n"),
        # the attention's output scaled while still in heads
        Example(_ATTN + "        if g is not None:\n            out = out * g.unsqueeze(-1)\n"
                "        out = out.reshape(*shape, -1).contiguous()\n        return out * g2\n",
                _ATTN + "        if g is not None:\n"
                "            out = (out.unflatten(-1, (-1, self.head_dim)) * g.unsqueeze(-1)).flatten(-2)\n"
                "        out = out.reshape(*shape, -1).contiguous()\n        return out * g2\n"),
        # a factor of the output's own shape, element by element: flat in the engine too, unchanged
        Example(_ATTN + "        out = out * torch.sigmoid(g)\n        return out.reshape(*shape, -1)\n",
                _ATTN + "        out = out * torch.sigmoid(g)\n        return out.reshape(*shape, -1)\n"),
        # once merged back to one row per token, a product is not per head: unchanged
        Example(_ATTN + "        out = out.reshape(*shape, -1)\n        out = out * g\n        return out\n",
                _ATTN + "        out = out.reshape(*shape, -1)\n        out = out * g\n        return out\n"),
    ]

    def visit_FunctionDef(self, node):
        self._in_heads: set[str] = set()  # locals holding the attention's output, still split into heads
        return super().visit_FunctionDef(node)

    def visit_Assign(self, node):
        if self.current_function != "forward" or not self._in_attention() or len(node.targets) != 1:
            return None
        self._in_heads = getattr(self, "_in_heads", set())
        target = node.targets[0].target
        first = target.elements[0].value if isinstance(target, cst.Tuple) and target.elements else target
        if isinstance(first, cst.Name) and self._attention_call(node.value):
            self._in_heads.add(first.value)  # HF's attention functions return [batch, seq, heads, head_dim]
        elif isinstance(target, cst.Name) and target.value in self._in_heads and not self._scaled(node):
            self._in_heads.discard(target.value)  # a reshape (or anything else): no longer known in heads
        return None

    def leave_Assign(self, original, updated):
        if not getattr(self, "_in_heads", None) or not self._scaled(original) or self.current_function != "forward":
            return updated
        head_dim = self.plan.attention(self.current_class or "").head_dim  # type: ignore[union-attr]
        name = updated.targets[0].target.value  # type: ignore[attr-defined]
        prod = updated.value
        heads = cst.parse_expression(f"{name}.unflatten(-1, (-1, {head_dim}))")
        side = "left" if m.matches(prod.left, m.Name(name)) else "right"  # type: ignore[attr-defined]
        flat = cst.parse_expression("Y.flatten(-2)")
        self.mark()
        return updated.with_changes(value=flat.with_changes(func=flat.func.with_changes(  # type: ignore[attr-defined]
            value=prod.with_changes(**{side: heads}, lpar=[cst.LeftParen()], rpar=[cst.RightParen()]))))

    def _attention_call(self, value: cst.BaseExpression) -> bool:
        """The engine's `self.attn(q, k, v)` (PT021 made it) or HF's attention function, not yet replaced."""
        return isinstance(value, cst.Call) and (m.matches(value.func, m.Attribute(m.Name("self"), m.Name("attn")))
                                                or m.matches(value.func, m.Name())
                                                and value.func.value in attention_call_names(self.ctx.idx))

    def _scaled(self, node: cst.Assign) -> bool:
        """`out = out * g` / `out = g * out` of a local still in heads: an elementwise product."""
        target = node.targets[0].target if len(node.targets) == 1 else None
        if not isinstance(target, cst.Name) or target.value not in getattr(self, "_in_heads", ()):
            return False
        prod = node.value
        if not (isinstance(prod, cst.BinaryOperation) and isinstance(prod.operator, cst.Multiply) and (
                m.matches(prod.left, m.Name(target.value)) != m.matches(prod.right, m.Name(target.value)))):
            return False
        other = prod.right if m.matches(prod.left, m.Name(target.value)) else prod.left
        return _one_per_head(other)

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
