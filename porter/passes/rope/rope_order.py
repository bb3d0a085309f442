"""PT244 rope-order: the rule `RopeOrder`; its `why` says what it rewrites and why."""

from __future__ import annotations

import textwrap

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import findall
from porter.errors import PorterError
from porter.passes._edit import FILTER, add_to_filter
from porter.passes.base import Example, Rule

HELPER = "rotary_order"
_GET_ROPE = m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self"), attr=m.Name("rotary_emb")))],
                     value=m.Call(func=m.Name("get_rope")))
_ORDER = (
    "inv_freq = torch.arange(half)\nn = config.rope_parameters[\"n\"]\n"
    "inv_freq_2 = torch.empty_like(inv_freq)\n"
    "inv_freq_2[:n] = torch.cat([inv_freq[:n][0::2], inv_freq[:n][1::2]])\n"
    "inv_freq_2[n:] = inv_freq[n:]\norder = inv_freq_2"
)
_ROTARY = (
    "def rotate_half(x):\n    x1 = x[..., : x.shape[-1] // 2]\n    x2 = x[..., x.shape[-1] // 2 :]\n"
    "    return torch.cat((-x2, x1), dim=-1)\n\n\n"
    "def apply_rotary_pos_emb(q, k, cos, sin):\n"
    "    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin\n\n\n"
    "class Rotary(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.inv_freq = self.compute(config)\n\n"
    "    @staticmethod\n    def compute(config):\n"
    "        inv_freq = 1.0 / (10000 ** (torch.arange(0, 32, 2) / 32))\n"
    "        n = config.rope_parameters[\"n\"]\n"
    "        inv_freq_2 = torch.empty_like(inv_freq)\n"
    "        inv_freq_2[:n] = torch.cat([inv_freq[:n][0::2], inv_freq[:n][1::2]])\n"
    "        inv_freq_2[n:] = inv_freq[n:]\n"
    "        return inv_freq_2\n\n"
    "    def forward(self, x, position_ids):\n"
    "        freqs = position_ids[..., None] * self.inv_freq\n"
    "        emb = torch.cat((freqs, freqs), dim=-1)\n"
    "        return emb.cos(), emb.sin()\n\n\n"
)
_ATTN = (
    "import torch\nfrom torch import nn\n\n\n" + _ROTARY + "{helper}"
    "class Attn(nn.Module):\n    def __init__(self, config, layer_idx):\n        super().__init__()\n"
    "        self.head_dim = config.head_dim\n"
    "        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n"
    "        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
    "        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
    "        self.o_proj = nn.Linear(config.num_heads * self.head_dim, config.hidden_size)\n"
    "        self.rotary_emb = get_rope(self.head_dim, max_position=config.max_position_embeddings, "
    "rope_parameters=config.rope_parameters, is_neox_style=True)\n{init}\n"
    "    def forward(self, x, position_embeddings):\n        q = self.q_proj(x)\n"
    "        k = self.k_proj(x)\n        v = self.v_proj(x)\n        cos, sin = position_embeddings\n"
    "        q, k = apply_rotary_pos_emb(q, k, cos, sin)\n"
    "        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)\n"
    "        return self.o_proj(out)\n\n\n"
    "class LM(nn.Module):\n"
    "    def port_weights(self, weights):\n"
    "        for name, loaded_weight in weights:\n"
    "{fold}"
    "            yield name, loaded_weight\n"
)
_HELPER = (
    "def {name}(config, layer_idx: int, half: int) -> list[int]:\n"
    "    \"\"\"HF's rotary turns pair j of a head (channels j and j + half) at the standard frequency\n"
    "    order[j]: the order, from the statements that rearrange HF's table, run on the indices.\"\"\"\n"
    "{body}\n"
    "    return order.tolist()\n\n\n"
)
_INIT = "        self.{name} = {name}(config, layer_idx, self.rotary_emb.rotary_dim // 2)\n"
_FOLD = (
    "            if any(proj in name for proj in {projs}):\n"
    "                attn = self.get_submodule(name.rsplit(\".\", 2)[0])\n"
    "                if hasattr(attn, \"{name}\"):\n"
    "                    # HF's rotary turns pair j of each head at the standard frequency order[j], the\n"
    "                    # engine's at j: each rotated half of the q/k rows moved to the engine's order\n"
    "                    # (row j to order[j]), the same for q and k, so q . k is unchanged\n"
    "                    rope = attn.rotary_emb\n"
    "                    heads = loaded_weight.unflatten(0, (-1, rope.head_size))\n"
    "                    half = rope.rotary_dim // 2\n"
    "                    source = torch.argsort(torch.tensor(attn.{name}))\n"
    "                    loaded_weight = torch.cat(\n"
    "                        [heads[:, :half][:, source], heads[:, half : 2 * half][:, source], heads[:, 2 * half :]],\n"
    "                        dim=1,\n"
    "                    ).flatten(0, 1)\n"
)


def _helper_src(order: str) -> str:
    return _HELPER.format(name=HELPER, body=textwrap.indent(order, "    "))


class RopeOrder(Rule):
    descend_methods = frozenset()  # works on __init__ and load_weights' filter as a whole
    code = "PT244"
    name = "rope-order"
    why = (
        "Some rotary modules build the standard inverse frequencies and write them into a new table "
        "in another order (CohereCompass: `t = torch.empty_like(inv_freq); t[:hw] = "
        "torch.cat([inv_freq[:hw][0::2], inv_freq[:hw][1::2]]); t[-n:] = inv_freq[-n:]`), so the pair "
        "(j, j + half) of a head turns at the standard frequency order[j]; the engine's get_rope turns "
        "pair j at frequency j. The port replays those statements on the indices (a module helper of "
        "`config` and `layer_idx`, since the sizes come from the layer's rope_parameters) and, when "
        "loading, moves each rotated half of the q and k rows to the engine's order (row j to "
        "order[j]): the engine then turns every pair as HF does, and the same move of q and k leaves "
        "q . k unchanged. The planner admits this only when only moves fill the table (slices, "
        "torch.cat), the rotary puts any sections it splits back in order, and nothing but the "
        "projections touches q and k in the attention. A permutation of rows is exact."
    )
    examples = [Example(
        _ATTN.format(helper="", init="", fold=""),
        _ATTN.format(helper=_helper_src(_ORDER), init=_INIT.format(name=HELPER),
                     fold=_FOLD.format(name=HELPER, projs='(".q_proj.", ".k_proj.")')))]

    @classmethod
    def applies(cls, ctx) -> bool:
        return any(a.rope_order for a in ctx.plan.attentions)

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        if len(self.scope) != 1:
            return updated
        attn = self.plan.attention(cls or "")
        if attn and attn.rope_order and updated.name.value == "__init__":
            self.mark(f"{cls}.__init__")
            return updated.with_changes(body=self._after_rope(updated.body))
        if updated.name.value == FILTER:
            return self._fold(cls, updated)
        return updated

    def _after_rope(self, block):
        """`self.rotary_order = ...` right after `self.rotary_emb = get_rope(...)` (in its block)."""
        body = []
        for st in block.body:
            if isinstance(st, cst.If) and findall(st.body, _GET_ROPE):
                st = st.with_changes(body=self._after_rope(st.body))
            body.append(st)
            if m.matches(st, m.SimpleStatementLine(body=[_GET_ROPE])):
                body.append(cst.parse_statement(_INIT.format(name=HELPER).strip() + "\n"))
        return block.with_changes(body=body)

    def _fold(self, cls, fn: cst.FunctionDef) -> cst.FunctionDef:
        projs = list(dict.fromkeys(f".{p}." for a in self.plan.attentions if a.rope_order for p in (a.q, a.k)))
        if any(a.rope_order and a.packed for a in self.plan.attentions):
            raise PorterError("rotary table in another order in a packed q/k/v projection: no rule moves "
                              "the rows of q and k in it", file=self.ctx.idx.path, rule=self.name)
        fold = cst.parse_module(textwrap.dedent(_FOLD.format(
            name=HELPER, projs="(" + ", ".join(f'"{p}"' for p in projs) + ")"))).body
        out = add_to_filter(fn, list(fold))
        if out is None:
            raise PorterError("load_weights without its filter: cannot move the rotary's rows of q/k",
                              file=self.ctx.idx.path, rule=self.name)
        self.mark(f"{cls}.{FILTER}")
        return out

    def leave_Module(self, original, updated):
        attn = next((a for a in self.plan.attentions if a.rope_order), None)
        if attn is None:
            return updated
        helper = [st.with_changes(leading_lines=[cst.EmptyLine(), cst.EmptyLine()])
                  for st in cst.parse_module(_helper_src(attn.rope_order)).body]
        body = []
        for st in updated.body:
            if isinstance(st, cst.ClassDef) and st.name.value == attn.cls:
                body.extend(helper)
            body.append(st)
        self.mark(HELPER)
        return updated.with_changes(body=body)
