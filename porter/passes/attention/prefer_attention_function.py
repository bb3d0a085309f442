"""Keep the attention-function arm where HF offers an inline re-implementation beside it."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import dotted, findall, self_call_attr
from porter.passes.base import Example, Rule
from porter.analysis.layouts import attention_call_names


class PreferAttentionFunction(Rule):
    code = "PT124"
    name = "prefer-attention-function"
    why = (
        "GPT-2 style attention chooses at run time between the attention function "
        "(`attention_interface(self, q, k, v, ...)`) and a method of its own that computes the same "
        "scores, softmax and weighted sum inline with a different op order or upcast "
        "(`if using_eager and self.reorder_and_upcast_attn: out = self._upcast_and_reordered_attn(...)`). "
        "The engine's Attention op replaces the attention function, so the `if` keeps that arm; the "
        "inline method, called nowhere else, is dropped with it."
    )
    @classmethod
    def applies(cls, ctx) -> bool:
        return "softmax" in ctx.idx.identifiers

    examples = [
        Example(
            "class Attn(nn.Module):\n    def _reordered(self, q, k, v):\n"
            "        w = torch.softmax(q @ k.transpose(-1, -2), dim=-1)\n        return w @ v, w\n\n"
            "    def forward(self, q, k, v):\n        if self.reorder:\n"
            "            out, w = self._reordered(q, k, v)\n        else:\n"
            "            out, w = attention_interface(self, q, k, v, None)\n        return out\n",
            "class Attn(nn.Module):\n"
            "    def forward(self, q, k, v):\n"
            "        out, w = attention_interface(self, q, k, v, None)\n        return out\n",
        )
    ]

    def visit_ClassDef(self, node):
        self._dropped: set[str] = set()
        return super().visit_ClassDef(node)

    def _inline_methods(self, cls: str) -> set[str]:
        info = self.ctx.idx.classes.get(cls)
        if info is None:
            return set()
        out = set()
        for st in info.node.body.body:
            if isinstance(st, cst.FunctionDef) and st.name.value != "forward" and findall(
                    st, m.Call(func=m.Attribute(attr=m.Name("softmax")) | m.Name("softmax"))):
                out.add(st.name.value)
        return out

    def _arm(self, block: cst.BaseSuite, names: set[str]) -> str | None:
        """"attn" when the arm calls the attention function, the method name when it calls an inline one."""
        calls = findall(block, m.Call())
        if any(dotted(c.func) in names for c in calls):  # type: ignore[attr-defined]
            return "attn"
        inline = {self_call_attr(c) for c in calls} & self._inline_methods(self.current_class or "")
        return next(iter(inline)) if len(inline) == 1 else None

    def leave_If(self, original, updated):
        if not self.kept(self.current_class) or self.current_function != "forward" or updated.orelse is None \
                or isinstance(updated.orelse, cst.If):
            return updated
        names = attention_call_names(self.ctx.idx)
        body, orelse = self._arm(updated.body, names), self._arm(updated.orelse.body, names)
        if body == "attn" and orelse not in (None, "attn"):
            self._dropped.add(orelse)  # type: ignore[arg-type]
            return cst.FlattenSentinel(list(updated.body.body))
        if orelse == "attn" and body not in (None, "attn"):
            self._dropped.add(body)  # type: ignore[arg-type]
            return cst.FlattenSentinel(list(updated.orelse.body.body))
        return updated

    def leave_ClassDef(self, original, updated):
        dropped = getattr(self, "_dropped", set())
        if dropped and len(self.scope) == 1:
            still = {self_call_attr(c) for c in findall(updated, m.Call())}
            gone = dropped - still
            if gone:
                body = [st for st in updated.body.body
                        if not (isinstance(st, cst.FunctionDef) and st.name.value in gone)]
                if body and body[0] is not updated.body.body[0] and isinstance(body[0], cst.FunctionDef):
                    body[0] = body[0].with_changes(leading_lines=())
                updated = updated.with_changes(body=updated.body.with_changes(body=body))
            self._dropped = set()
        return super().leave_ClassDef(original, updated)
