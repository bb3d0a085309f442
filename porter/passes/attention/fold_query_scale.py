"""PT029 fold-query-scale: the rule `FoldQueryScale`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst.matchers as m

from porter.analysis.cstutil import code, dotted, findall
from porter.passes.base import Example, Rule
from porter.analysis.layouts import attention_call_names, query_prescale


class FoldQueryScale(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT029"
    name = "fold-query-scale"
    why = (
        "OPT scales the query by hand (`self.q_proj(x) * self.scaling`) and calls attention with "
        "`scaling=1.0`. The engine's `Attention` applies its scale inside the kernel, so the port "
        "passes `scale=self.scaling` (PT021 reads it from the plan) and drops the product: one "
        "elementwise multiply of the query less per layer, as in vLLM's own OPT. Only a query "
        "projection of its own is folded: a packed q/k/v product would scale k and v too."
    )
    _src = (
        "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
        "        super().__init__()\n        self.head_dim = config.head_dim\n"
        "        self.scaling = self.head_dim**-0.5\n"
        "        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)\n"
        "        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)\n"
        "        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)\n\n"
        "    def forward(self, x, attention_mask):\n        q = {q}\n        k = self.k_proj(x)\n"
        "        v = self.v_proj(x)\n"
        "        out, _ = attention_interface(self, q, k, v, attention_mask, scaling=1.0)\n"
        "        return out\n"
    )
    examples = [
        Example(_src.format(q="self.q_proj(x) * self.scaling"), _src.format(q="self.q_proj(x)")),
    ]

    @classmethod
    def classes(cls, ctx) -> set[str] | None:
        return {a.cls for a in ctx.plan.attentions if not a.packed}

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        attn = self.plan.attention(cls or "")
        if not attn or attn.packed or len(self.scope) != 1 or updated.name.value != "forward":
            return updated
        names = attention_call_names(self.ctx.idx)
        call = next((c for c in findall(updated, m.Call()) if dotted(c.func) in names), None)  # type: ignore[attr-defined]
        found = query_prescale(updated, attn.q, call) if call is not None else None
        if found is None or code(found[2]) != attn.scale:
            return updated
        product, proj, _ = found
        return updated.deep_replace(product, proj)
