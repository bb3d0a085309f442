"""PT264 drop-kv-repeat: the rule `DropKvRepeat`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import findall
from porter.passes.base import Example, Rule

_ATTN = (
    "from torch import nn\n\n\n"
    "def repeat_kv(hidden_states, n_rep):\n"
    "    batch, num_key_value_heads, slen, head_dim = hidden_states.shape\n"
    "    if n_rep == 1:\n        return hidden_states\n"
    "    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)\n"
    "    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)\n\n\n"
    "class Attn(nn.Module):\n    def __init__(self, config):\n"
    "        super().__init__()\n        self.head_dim = config.head_dim\n"
    "        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n"
    "        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
    "        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
    "        self.attn = Attention(config.num_heads, self.head_dim, num_kv_heads=config.num_kv_heads)\n\n"
    "    def forward(self, x):\n"
    "        q = self.q_proj(x)\n        k = self.k_proj(x)\n        v = self.v_proj(x)\n"
)


def _repeats_heads(fn: cst.FunctionDef) -> bool:
    """A helper that repeats KV heads: `x[:, :, None, ...].expand(...)` (a new axis broadcast, then
    folded into the heads) or `repeat_interleave`."""
    for call in findall(fn, m.Call(func=m.Attribute(attr=m.Name("expand")))):
        recv = call.func.value  # type: ignore[attr-defined]
        if isinstance(recv, cst.Subscript) and any(
                m.matches(e.slice, m.Index(value=m.Name("None"))) for e in recv.slice):
            return True
    return bool(findall(fn, m.Call(func=m.Attribute(attr=m.Name("repeat_interleave")))))


class DropKvRepeat(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT264"
    name = "drop-kv-repeat"
    why = (
        "transformers 4.x attentions repeat the KV heads in forward (`k = repeat_kv(k, self.num_key_value_groups)`) "
        "before their attention call; the engine's `Attention` takes the KV heads as they are "
        "(`num_kv_heads`) and shares them across the query heads itself. A statement that rebinds k or v "
        "of the engine call from a module helper that repeats heads (a broadcast of a new axis folded "
        "into the heads, or `repeat_interleave`) is dropped; under an `if` without `else` (remote code's "
        "`if self.multi_query_attention:`), so is what only computed the repeat count, and the `if` when empty."
    )
    examples = [
        Example(
            _ATTN + "        k = repeat_kv(k, 2)\n        v = repeat_kv(v, 2)\n"
            "        out = self.attn(q, k, v)\n        return out\n",
            _ATTN + "        out = self.attn(q, k, v)\n        return out\n",
        ),
        # a repeat under a test of the attention's own flag (ChatGLM's multi-query), its count computed there
        Example(
            _ATTN + "        if self.multi_query:\n            n = self.heads // self.groups\n"
            "            k = repeat_kv(k, n)\n            v = repeat_kv(v, n)\n"
            "        out = self.attn(q, k, v)\n        return out\n",
            _ATTN + "        out = self.attn(q, k, v)\n        return out\n",
        ),
        # must leave unchanged: a helper that does not repeat heads (a scale) keeps its call
        Example(
            _ATTN.replace("[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)",
                          " * n_rep") + "        k = repeat_kv(k, 2)\n        out = self.attn(q, k, v)\n        return out\n",
            _ATTN.replace("[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)",
                          " * n_rep") + "        k = repeat_kv(k, 2)\n        out = self.attn(q, k, v)\n        return out\n",
        ),
    ]

    def visit_Module(self, node: cst.Module) -> bool | None:
        self._repeaters = {st.name.value for st in node.body
                           if isinstance(st, cst.FunctionDef) and _repeats_heads(st)}
        self._engine_attn: set[str] = set()
        return True

    def visit_ClassDef(self, node: cst.ClassDef) -> bool | None:
        # a class whose `self.attn` is the engine's Attention op (PT021 built it)
        op = m.Call(func=m.Name(self.ctx.bound_name("Attention")))
        if findall(node, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self"), attr=m.Name("attn")))],
                                  value=op)):
            self._engine_attn.add(node.name.value)
        return super().visit_ClassDef(node)

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        if not self._repeaters or len(self.scope) != 1 or updated.name.value != "forward" \
                or cls not in self._engine_attn:
            return updated
        kv: set[str] = set()
        for call in findall(updated, m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name("attn")))):
            args = call.args  # type: ignore[attr-defined]
            if len(args) == 3:
                kv.update(a.value.value for a in args[1:] if isinstance(a.value, cst.Name))
        body, dropped = self._filter(list(updated.body.body), kv)
        if not dropped:
            return updated
        self.mark(f"{cls}.forward")
        return updated.with_changes(body=updated.body.with_changes(body=body))

    def _filter(self, stmts: list, kv: set[str]) -> tuple[list, bool]:
        """STMTS without the repeats; inside an `if` without `else` (`if self.multi_query_attention:`),
        also without what only computed the repeat count there, and the `if` gone when left empty."""
        out, dropped = [], False
        for st in stmts:
            if self._repeat(st, kv):
                dropped = True
                continue
            if isinstance(st, cst.If) and st.orelse is None:
                inner, d = self._filter(list(st.body.body), kv)
                if d:
                    dropped = True
                    inner = [x for x in inner if not self._dead_count(x, inner)]
                    if not inner:
                        continue
                    st = st.with_changes(body=st.body.with_changes(body=inner))
            out.append(st)
        return out, dropped

    @staticmethod
    def _dead_count(st: cst.BaseStatement, block: list) -> bool:
        """`n = ...` in BLOCK that nothing in BLOCK reads any more (the repeat count of a dropped repeat)."""
        if not m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())])])):
            return False
        name = st.body[0].targets[0].target.value  # type: ignore[attr-defined]
        return not any(findall(x, m.Name(name)) for x in block if x is not st)

    def _repeat(self, st: cst.BaseStatement, kv: set[str]) -> bool:
        """`k = repeat_kv(k, n)` for k an argument of the engine's attention call."""
        if not m.matches(st, m.SimpleStatementLine(body=[m.Assign(
                targets=[m.AssignTarget(m.Name())], value=m.Call(func=m.Name()))])):
            return False
        a = st.body[0]  # type: ignore[attr-defined]
        name = a.targets[0].target.value
        args = a.value.args
        return (a.value.func.value in self._repeaters and name in kv and bool(args)
                and m.matches(args[0].value, m.Name(name)))
