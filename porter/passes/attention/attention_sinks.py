"""Attention sinks: one learned logit per head, sharded with the heads across TP ranks."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import self_attr
from porter.errors import PorterError
from porter.passes.base import Example, Rule

_ATTN = (
    "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
    "        super().__init__()\n        self.head_dim = config.head_dim\n"
    "        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n"
    "        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
    "        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
    "{sinks}"
    "    def forward(self, x, attention_mask):\n"
    "        q = self.q_proj(x)\n        k = self.k_proj(x)\n        v = self.v_proj(x)\n"
    "        out, _ = attention_interface(self, q, k, v, attention_mask, scaling=1.0, s_aux=self.sinks)\n"
    "        return out\n"
)


class AttentionSinks(Rule):
    descend_methods = frozenset()  # works on __init__ as a whole
    code = "PT160"
    name = "attention-sinks"
    why = (
        "An HF attention call with `s_aux=self.sinks` adds one learned logit per head to the "
        "softmax (the sink takes probability mass, attends to nothing). The engine's `Attention` "
        "takes the same per-head tensor (`sinks=`, PT021 passes it), but for the heads of this "
        "rank only: the `nn.Parameter` of `num_heads` values is built with `num_heads // "
        "tp_size` and loaded with the engine's `sharded_weight_loader(0)`, which takes this "
        "rank's slice of the checkpoint's vector, in the order the fused qkv projection gives the "
        "ranks their heads. Without this the port would drop the sinks and silently compute "
        "plain softmax attention."
    )
    examples = [
        Example(
            _ATTN.format(sinks="        self.sinks = nn.Parameter(torch.empty(config.num_heads, dtype=torch.float32))\n\n"),
            _ATTN.format(sinks=(
                "        self.sinks = nn.Parameter(torch.empty(config.num_heads // "
                "get_tensor_model_parallel_world_size(), dtype=torch.float32))\n"
                "        self.sinks.weight_loader = sharded_weight_loader(0)\n\n")),
        ),
    ]

    @classmethod
    def applies(cls, ctx) -> bool:
        return any(a.sinks for a in ctx.plan.attentions)

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        attn = self.plan.attention(cls or "")
        if not attn or not attn.sinks or len(self.scope) != 1 or updated.name.value != "__init__":
            return updated
        attr = self_attr(cst.parse_expression(attn.sinks))
        body, done = [], False
        for st in updated.body.body:
            body.append(st)
            new = self._sharded(st, attr) if attr and not done else None
            if new is not None:
                body[-1] = new
                body.append(cst.parse_statement(
                    f"self.{attr}.weight_loader = {self.ctx.use('sharded_weight_loader')}(0)\n"))
                done = True
        if not done:
            raise PorterError(
                "attention sinks that are not a 1-D nn.Parameter of the attention's __init__: cannot "
                "shard them per TP rank", file=self.ctx.idx.path, line=attn.line,
                construct=f"{cls}.__init__: {attn.sinks}", rule=self.name)
        return updated.with_changes(body=updated.body.with_changes(body=body))

    def _sharded(self, st: cst.BaseStatement, attr: str) -> cst.BaseStatement | None:
        """`self.sinks = nn.Parameter(torch.empty(N, ...))` with N // tp_size, else None."""
        param = m.Call(func=m.Attribute(attr=m.Name("Parameter")) | m.Name("Parameter"),
                       args=[m.Arg(value=m.Call(func=m.Attribute(value=m.Name("torch"))), keyword=None),
                             m.ZeroOrMore()])
        if not m.matches(st, m.SimpleStatementLine(body=[m.Assign(
                targets=[m.AssignTarget(m.Attribute(value=m.Name("self"), attr=m.Name(attr)))], value=param)])):
            return None
        assign = st.body[0]  # type: ignore[attr-defined]
        inner = assign.value.args[0].value
        sizes = [a for a in inner.args if a.keyword is None]
        if len(sizes) != 1:
            return None
        tp = cst.parse_expression(f"{self.ctx.use('get_tensor_model_parallel_world_size')}()")
        size = cst.BinaryOperation(sizes[0].value, cst.FloorDivide(), tp)
        args = [a.with_changes(value=size) if a is sizes[0] else a for a in inner.args]
        return st.with_changes(body=[assign.with_changes(value=assign.value.with_changes(
            args=[assign.value.args[0].with_changes(value=inner.with_changes(args=args)),
                  *assign.value.args[1:]]))])
