"""PT298 drop-uncalled-attention: the rule `DropUncalledAttention`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import findall
from porter.passes.attention._score_arms import computes_softmax
from porter.passes.base import Example, Rule


class DropUncalledAttention(Rule):
    descend_methods = frozenset()
    code = "PT298"
    name = "drop-uncalled-attention"
    why = (
        "GPT-2-era attentions carry a second way to compute the scores that their forward never calls "
        "(Qwen-1 keeps GPT-2's `_upcast_and_reordered_attn` although its forward calls only `_attn`). "
        "Once the attention is the engine's, such a method is dead code that still reads what the port no "
        "longer needs: the causal-mask buffer (max_position² booleans per layer), which PT126 can then drop. "
        "A method of an attention that takes a softmax itself and that no method of the class calls goes."
    )
    _src = (
        "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
        "        super().__init__()\n        self.head_dim = config.head_dim\n"
        "        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)\n"
        "        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)\n"
        "        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)\n\n{extra}"
        "    def forward(self, x):\n        q = self.q_proj(x)\n        k = self.k_proj(x)\n"
        "        v = self.v_proj(x)\n"
        "        out, _ = attention_interface(self, q, k, v, None)\n        return out\n"
    )
    _upcast = (
        "    def _upcast_and_reordered_attn(self, q, k, v):\n"
        "        w = torch.matmul(q.float(), k.transpose(-1, -2).float())\n"
        "        return torch.matmul(nn.functional.softmax(w, dim=-1), v)\n\n"
    )
    examples = [
        Example(_src.format(extra=_upcast), _src.format(extra="")),
    ]

    @classmethod
    def classes(cls, ctx) -> set[str] | None:
        return {a.cls for a in ctx.plan.attentions}

    def leave_ClassDef(self, original, updated):
        super().leave_ClassDef(original, updated)
        if self.scope or self.plan.attention(updated.name.value) is None:
            return updated
        called = {c.func.attr.value for c in findall(updated, m.Call(func=m.Attribute(value=m.Name("self"))))}  # type: ignore[attr-defined]
        called |= {a.attr.value for a in findall(updated, m.Attribute(value=m.Name("self")))}  # also read as a value
        body = [st for st in updated.body.body if not (
            isinstance(st, cst.FunctionDef) and st.name.value not in ("forward", "__init__")
            and st.name.value not in called and computes_softmax(st))]
        if len(body) == len(updated.body.body):
            return updated
        self.mark(f"{updated.name.value}")
        return updated.with_changes(body=updated.body.with_changes(body=body))
