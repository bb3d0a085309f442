"""PT241 reversed-rope: the rule `ReversedRope`; its `why` says what it rewrites and why."""

from __future__ import annotations

import textwrap

import libcst as cst

from porter.errors import PorterError
from porter.passes._edit import FILTER, add_to_filter
from porter.passes.base import Example, Rule


_LOAD = (
    "class LM(nn.Module):\n"
    "    def port_weights(self, weights):\n"
    "        for name, loaded_weight in weights:\n"
    "            if \"rotary_emb.inv_freq\" in name:\n                continue\n"
    "{fold}"
    "            yield name, loaded_weight\n"
)
_ATTN = (
    "from torch import nn\n\n\ndef rotate_half(x):\n"
    "    x1 = x[..., : x.shape[-1] // 2]\n    x2 = x[..., x.shape[-1] // 2 :]\n"
    "    return torch.cat((x2, -x1), dim=-1)\n\n\n"
    "def apply_rotary_pos_emb(q, k, cos, sin):\n"
    "    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin\n\n\n"
    "class Attn(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.head_dim = config.head_dim\n"
    "        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n"
    "        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
    "        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n\n"
    "    def forward(self, x, position_embeddings):\n        q = self.q_proj(x)\n"
    "        k = self.k_proj(x)\n        v = self.v_proj(x)\n        cos, sin = position_embeddings\n"
    "        q, k = apply_rotary_pos_emb(q, k, cos, sin)\n"
    "        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)\n"
    "        return out\n\n\n"
)
_FOLD = (
    "            if any(proj in name for proj in {projs}):\n"
    "                # HF's rotary turns the other way (rotate_half returns cat(x2, -x1)): the second half of\n"
    "                # each rotated q/k head negated, so the engine's rotation gives HF's q and k with that\n"
    "                # half negated, which cancels in q . k\n"
    "                rope = self.get_submodule(name.rsplit(\".\", 2)[0]).rotary_emb\n"
    "                heads = loaded_weight.unflatten(0, (-1, rope.head_size))\n"
    "                half = rope.rotary_dim // 2\n"
    "                loaded_weight = torch.cat(\n"
    "                    [heads[:, :half], -heads[:, half : 2 * half], heads[:, 2 * half :]], dim=1\n"
    "                ).flatten(0, 1)\n"
)


class ReversedRope(Rule):
    descend_methods = frozenset()  # works on load_weights' filter as a whole
    code = "PT241"
    name = "reversed-rope"
    why = (
        "The engine's get_rope rotates each pair of halves (x1, x2) of a head by +theta (`x * cos + "
        "cat(-x2, x1) * sin`); a `rotate_half` returning `cat(x2, -x1)` (NanoChat) rotates by -theta. "
        "With N the sign of each head's second rotated half flipped, R(-theta) = N R(theta) N: the "
        "port negates that half of the q and k projections when loading, so the engine's rotation "
        "yields HF's rotated q and k with that half negated, and N cancels in q . k. The planner "
        "admits this only when q and k reach the attention through nothing but RMS norms over the "
        "head (x^2 and an elementwise weight commute with N); otherwise it refuses. Sign flips are "
        "exact in floating point: nothing is approximated."
    )
    examples = [Example(_ATTN + _LOAD.format(fold=""),
                        _ATTN + _LOAD.format(fold=_FOLD.format(projs='(".q_proj.", ".k_proj.")')))]

    @classmethod
    def applies(cls, ctx) -> bool:
        return any(a.rope_reversed for a in ctx.plan.attentions)

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        if updated.name.value != FILTER or len(self.scope) != 1:
            return updated
        projs = list(dict.fromkeys(f".{p}." for a in self.plan.attentions if a.rope_reversed for p in (a.q, a.k)))
        if any(a.rope_reversed and a.packed for a in self.plan.attentions):
            raise PorterError("rotary that turns the other way in a packed q/k/v projection: no rule "
                              "negates half of q and k in it", file=self.ctx.idx.path, rule=self.name)
        fold = cst.parse_module(textwrap.dedent(_FOLD.format(projs="(" + ", ".join(f'"{p}"' for p in projs) + ")"))).body
        out = add_to_filter(updated, list(fold))
        if out is None:
            raise PorterError("load_weights without its filter: cannot fold the rotary's sign into q/k",
                              file=self.ctx.idx.path, rule=self.name)
        self.mark(f"{cls}.{FILTER}")
        return out
