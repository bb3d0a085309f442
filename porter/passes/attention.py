"""Rules that turn HF attention into the engine's: rotary, Attention op, flat heads, fused q/k/v."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import findall, assigned_names, code, dotted, param_names, self_call_attr
from porter.errors import PorterError
from porter.analysis.grouped_qkv import grouped_split
from porter.passes.base import Example, Rule
from porter.passes.tp_norms import head_spanning_norms
from porter.plan import (
    attention_call_names, packed_split_call, per_head_split_helper, query_prescale,
)


def _append_to_init(fn: cst.FunctionDef, stmts: list[cst.BaseStatement]) -> cst.FunctionDef:
    return fn.with_changes(body=fn.body.with_changes(body=[*fn.body.body, *stmts]))


def _is_assign_of(st: cst.CSTNode, attr: str) -> bool:
    return m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(
        target=m.Attribute(value=m.Name("self"), attr=m.Name(attr)))])]))


_ROPE_TABLE_BY_KEY = m.Subscript(value=m.Attribute(attr=m.Name("rope_parameters")),
                                 slice=[m.SubscriptElement(slice=m.Index(value=m.Name()))])


def _rope_by_layer_type(ctx) -> bool:
    """The HF rotary module builds one table per layer type (`config.rope_parameters[layer_type]`)."""
    classes = ctx.idx.classes
    return any(findall(classes[c].node, _ROPE_TABLE_BY_KEY)
               for c in ctx.plan.rotary_classes if c in classes)


class EngineRope(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT020"
    name = "engine-rope"
    why = (
        "HF computes cos/sin once per model (a RotaryEmbedding module) and threads them to every "
        "attention as `position_embeddings`. The engine's `get_rope` module lives in the attention "
        "and rotates flat q/k in place from `positions`: `q, k = self.rotary_emb(positions, q, k)`. "
        "The HF rotary module is removed; its layout (NeoX halves or GPT-J interleaved) is read from "
        "the source's rotate helper; rope_theta, scaling and partial factor come from "
        "`config.rope_parameters` at run time."
    )
    examples = [
        Example(
            "from torch import nn\n\n\ndef apply_rotary_pos_emb(q, k, cos, sin):\n"
            "    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin\n\n\n"
            "class Attn(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.head_dim = config.head_dim\n"
            "        self.q_proj = nn.Linear(config.hidden_size, "
            "config.num_heads * self.head_dim)\n"
            "        self.k_proj = nn.Linear(config.hidden_size, "
            "config.num_kv_heads * self.head_dim)\n"
            "        self.v_proj = nn.Linear(config.hidden_size, "
            "config.num_kv_heads * self.head_dim)\n\n"
            "    def forward(self, x, position_embeddings):\n        q = self.q_proj(x)\n"
            "        k = self.k_proj(x)\n        v = self.v_proj(x)\n"
            "        cos, sin = position_embeddings\n"
            "        q, k = apply_rotary_pos_emb(q, k, cos, sin)\n"
            "        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)\n"
            "        return out\n",
            "from torch import nn\n\n\ndef apply_rotary_pos_emb(q, k, cos, sin):\n"
            "    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin\n\n\n"
            "class Attn(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.head_dim = config.head_dim\n"
            "        self.q_proj = nn.Linear(config.hidden_size, "
            "config.num_heads * self.head_dim)\n"
            "        self.k_proj = nn.Linear(config.hidden_size, "
            "config.num_kv_heads * self.head_dim)\n"
            "        self.v_proj = nn.Linear(config.hidden_size, "
            "config.num_kv_heads * self.head_dim)\n"
            "        self.rotary_emb = get_rope(self.head_dim, "
            "max_position=config.max_position_embeddings, rope_parameters=config.rope_parameters, "
            "is_neox_style=True)\n\n    def forward(self, x, position_embeddings):\n"
            "        q = self.q_proj(x)\n        k = self.k_proj(x)\n        v = self.v_proj(x)\n"
            "        cos, sin = position_embeddings\n"
            "        q, k = self.rotary_emb(positions, q, k)\n"
            "        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)\n"
            "        return out\n",
        ),
        Example(
            "from torch import nn\n\n\nclass ARotaryEmbedding(nn.Module):\n"
            "    def __init__(self, config):\n        super().__init__()\n"
            "        self.inv_freq = 1.0 / config.rope_theta\n\n"
            "    def forward(self, x, position_ids):\n        return self.inv_freq\n\n\n"
            "class AModel(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.rotary_emb = ARotaryEmbedding(config)\n"
            "        self.norm = nn.LayerNorm(config.hidden_size)\n",
            "from torch import nn\n\n\nclass ARotaryEmbedding(nn.Module):\n"
            "    def __init__(self, config):\n        super().__init__()\n"
            "        self.inv_freq = 1.0 / config.rope_theta\n\n"
            "    def forward(self, x, position_ids):\n        return self.inv_freq\n\n\n"
            "class AModel(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.norm = nn.LayerNorm(config.hidden_size)\n",
        ),
        Example(  # one rotary table per layer type (gemma3): each layer takes its own
            'from torch import nn\n'
            '\n'
            '\n'
            'def apply_rotary_pos_emb(q, k, cos, sin):\n'
            '    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin\n'
            '\n'
            '\n'
            'class ARotaryEmbedding(nn.Module):\n'
            '    def __init__(self, config):\n'
            '        super().__init__()\n'
            '        for layer_type in set(config.layer_types):\n'
            '            base = config.rope_parameters[layer_type]["rope_theta"]\n'
            '            setattr(self, f"{layer_type}_inv_freq", 1.0 / base)\n'
            '\n'
            '    def forward(self, x, position_ids, layer_type):\n'
            '        return x\n'
            '\n'
            '\n'
            'class Attn(nn.Module):\n'
            '    def __init__(self, config, layer_idx):\n'
            '        super().__init__()\n'
            '        self.head_dim = config.head_dim\n'
            '        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n'
            '        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n'
            '        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n'
            '\n'
            '    def forward(self, x, position_embeddings):\n'
            '        q = self.q_proj(x)\n'
            '        k = self.k_proj(x)\n'
            '        v = self.v_proj(x)\n'
            '        cos, sin = position_embeddings\n'
            '        q, k = apply_rotary_pos_emb(q, k, cos, sin)\n'
            '        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)\n'
            '        return out\n',
            'from torch import nn\n'
            '\n'
            '\n'
            'def apply_rotary_pos_emb(q, k, cos, sin):\n'
            '    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin\n'
            '\n'
            '\n'
            'class ARotaryEmbedding(nn.Module):\n'
            '    def __init__(self, config):\n'
            '        super().__init__()\n'
            '        for layer_type in set(config.layer_types):\n'
            '            base = config.rope_parameters[layer_type]["rope_theta"]\n'
            '            setattr(self, f"{layer_type}_inv_freq", 1.0 / base)\n'
            '\n'
            '    def forward(self, x, position_ids, layer_type):\n'
            '        return x\n'
            '\n'
            '\n'
            'class Attn(nn.Module):\n'
            '    def __init__(self, config, layer_idx):\n'
            '        super().__init__()\n'
            '        self.head_dim = config.head_dim\n'
            '        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n'
            '        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n'
            '        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n'
            '        self.rotary_emb = get_rope(self.head_dim, max_position=config.max_position_embeddings, rope_parameters=config.rope_parameters[config.layer_types[layer_idx]], is_neox_style=True)\n'
            '\n'
            '    def forward(self, x, position_embeddings):\n'
            '        q = self.q_proj(x)\n'
            '        k = self.k_proj(x)\n'
            '        v = self.v_proj(x)\n'
            '        cos, sin = position_embeddings\n'
            '        q, k = self.rotary_emb(positions, q, k)\n'
            '        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)\n'
            '        return out\n',
        ),
    ]

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        attn = self.plan.attention(cls or "")
        if not self.kept(cls) or len(self.scope) != 1:
            return updated
        if attn and attn.rope and updated.name.value == "__init__":
            neox = "True" if attn.rope == "neox" else "False"
            params = "config.rope_parameters"
            if _rope_by_layer_type(self.ctx):
                # one rotary table per layer type (gemma3: local and global theta): this layer's
                if "layer_idx" not in param_names(updated):
                    raise PorterError(
                        "rotary parameters chosen per layer type, but the attention is not told its "
                        "layer (no layer_idx parameter)", file=self.ctx.idx.path,
                        line=self.ctx.idx.classes[cls].line, construct=f"{cls}.__init__",
                        rule=self.name)
                params = "config.rope_parameters[config.layer_types[layer_idx]]"
            if attn.rope_theta:  # a table built in the source (PT151): its base and rotated dims
                params = f'{{"rope_theta": {attn.rope_theta}, "rope_dim": {attn.rope_dim}}}'
            st = cst.parse_statement(
                f"self.rotary_emb = {self.ctx.use('get_rope')}({attn.head_dim}, "
                f"max_position=config.max_position_embeddings, "
                f"rope_parameters={params}, is_neox_style={neox})\n"
            )
            self.mark(f"{cls}.__init__")
            return _append_to_init(updated, [st])
        if updated.name.value == "__init__":
            # drop `self.rotary_emb = XRotaryEmbedding(...)` in other classes
            info = self.ctx.idx.classes.get(cls or "")
            body = []
            for st in updated.body.body:
                rotary_attr = None
                if info:
                    for attr, sub in info.submodules.items():
                        if sub.ctor in self.plan.rotary_classes and _is_assign_of(st, attr):
                            rotary_attr = attr
                if rotary_attr:
                    self.ctx.removed_attrs.add((cls, rotary_attr))
                    self.mark(f"{cls}.__init__")
                    continue
                body.append(st)
            return updated.with_changes(body=updated.body.with_changes(body=body))
        return updated

    def leave_Call(self, original, updated):
        attn = self.plan.attention(self.current_class or "")
        if attn and attn.rope_helper and m.matches(updated.func, m.Name(attn.rope_helper)):
            q, k = updated.args[0].value, updated.args[1].value
            self.ctx.needs_positions.add(attn.cls)
            return cst.parse_expression("self.rotary_emb(positions, Q, K)").with_changes(
                args=[cst.Arg(cst.Name("positions")), cst.Arg(q), cst.Arg(k)]
            )
        return updated


ALIBI_HELPER = "alibi_slopes"
_ALIBI_SRC = f'''
def {ALIBI_HELPER}(total_num_heads: int, scale: float = 1.0) -> list[float]:
    """ALiBi slopes of this tensor-parallel rank's heads: the geometric sequence 2^(-8i/n) for the
    closest power of two n below the head count, then every other slope of 2n for the rest."""
    closest = 1 << (total_num_heads.bit_length() - 1)
    base = torch.tensor(2 ** (-8 / closest), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != total_num_heads:
        extra_base = torch.tensor(2 ** (-4 / closest), dtype=torch.float32)
        extra = min(closest, total_num_heads - closest)
        slopes = torch.cat([slopes, torch.pow(extra_base, torch.arange(1, 1 + 2 * extra, 2, dtype=torch.int32))])
    per_rank = total_num_heads // {{world}}()
    start = {{rank}}() * per_rank
    return (slopes[start : start + per_rank] * scale).tolist()
'''


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


class EngineAttention(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT021"
    name = "engine-attention"
    why = (
        "The HF attention call (`attention_interface(self, q, k, v, mask, scaling=..., ...)` or the "
        "eager function) becomes the engine's `Attention` op, `self.attn(q, k, v)`, which owns the "
        "paged KV cache. Its scale, sliding window, softcap and sinks (`s_aux`, made per-rank by "
        "PT160) are taken from the keyword arguments of the HF call; heads per rank come from the fused qkv projection (KV heads replicate when TP "
        "exceeds them). An ALiBi bias passed to the call becomes the op's per-rank slopes, under the "
        "config test that decides whether the model builds the bias (`... if config.alibi else None`, "
        "Falcon) when there is one. The attention weights HF returns beside the output are dropped."
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
            "config.num_kv_heads * self.head_dim)\n\n    def forward(self, x, attention_mask):\n"
            "        q = self.q_proj(x)\n        k = self.k_proj(x)\n        v = self.v_proj(x)\n"
            "        out, _ = attention_interface(self, q, k, v, attention_mask, "
            "scaling=self.scaling)\n        return out\n",
            "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.head_dim = config.head_dim\n"
            "        self.q_proj = nn.Linear(config.hidden_size, "
            "config.num_heads * self.head_dim)\n"
            "        self.k_proj = nn.Linear(config.hidden_size, "
            "config.num_kv_heads * self.head_dim)\n"
            "        self.v_proj = nn.Linear(config.hidden_size, "
            "config.num_kv_heads * self.head_dim)\n"
            "        self.attn = Attention(self.qkv_proj.num_heads, self.head_dim, "
            "scale=self.scaling, num_kv_heads=self.qkv_proj.num_kv_heads, "
            'cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn")\n\n'
            "    def forward(self, x, attention_mask):\n        q = self.q_proj(x)\n"
            "        k = self.k_proj(x)\n        v = self.v_proj(x)\n"
            "        out = self.attn(q, k, v)\n        return out\n",
        ),
        Example(
            "from torch import nn\n\n\n"
            "def eager_attention_forward(module, query, key, value, attention_mask, **kwargs):\n"
            "    ...\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.head_dim = config.head_dim\n"
            "        self.q_proj = nn.Linear(config.hidden_size, "
            "config.num_heads * self.head_dim)\n"
            "        self.k_proj = nn.Linear(config.hidden_size, "
            "config.num_kv_heads * self.head_dim)\n"
            "        self.v_proj = nn.Linear(config.hidden_size, "
            "config.num_kv_heads * self.head_dim)\n\n    def forward(self, x, attention_mask):\n"
            "        q = self.q_proj(x)\n        k = self.k_proj(x)\n        v = self.v_proj(x)\n"
            "        out = eager_attention_forward(self, q, k, v, attention_mask, "
            "sliding_window=self.sliding_window)\n        return out\n",
            "from torch import nn\n\n\n"
            "def eager_attention_forward(module, query, key, value, attention_mask, **kwargs):\n"
            "    ...\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.head_dim = config.head_dim\n"
            "        self.q_proj = nn.Linear(config.hidden_size, "
            "config.num_heads * self.head_dim)\n"
            "        self.k_proj = nn.Linear(config.hidden_size, "
            "config.num_kv_heads * self.head_dim)\n"
            "        self.v_proj = nn.Linear(config.hidden_size, "
            "config.num_kv_heads * self.head_dim)\n"
            "        self.attn = Attention(self.qkv_proj.num_heads, self.head_dim, "
            "scale=self.head_dim**-0.5, num_kv_heads=self.qkv_proj.num_kv_heads, "
            "cache_config=cache_config, quant_config=quant_config, "
            'per_layer_sliding_window=self.sliding_window, prefix=f"{prefix}.attn")\n\n'
            "    def forward(self, x, attention_mask):\n        q = self.q_proj(x)\n"
            "        k = self.k_proj(x)\n        v = self.v_proj(x)\n"
            "        out = self.attn(q, k, v)\n        return out\n",
        ),
    ]

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        attn = self.plan.attention(cls or "")
        if not attn or len(self.scope) != 1 or updated.name.value != "__init__":
            return updated
        sw = f"per_layer_sliding_window={attn.sliding_window}, " if attn.sliding_window else ""
        qkv = attn.q if attn.packed else "qkv_proj"
        if attn.softcap:
            sw += f"logits_soft_cap={attn.softcap}, "
        if attn.alibi:
            scale = f", {attn.alibi_scale}" if attn.alibi_scale else ""
            slopes = f"{ALIBI_HELPER}(self.{qkv}.total_num_heads{scale})"
            if attn.alibi_when:  # the config decides whether there is a bias (rotary otherwise: Falcon)
                slopes = f"{slopes} if {attn.alibi_when} else None"
            sw += f"alibi_slopes={slopes}, "
            self._alibi = True
        if attn.sinks:  # the per-rank parameter PT160 makes of it
            sw += f"sinks={attn.sinks}, "
        st = cst.parse_statement(
            f"self.attn = {self.ctx.use('Attention')}(self.{qkv}.num_heads, {attn.head_dim}, "
            f"scale={attn.scale}, num_kv_heads=self.{qkv}.num_kv_heads, cache_config=cache_config, "
            f"quant_config=quant_config, {sw}prefix=f\"{{prefix}}.attn\")\n"
        )
        self.mark(f"{cls}.__init__")
        return _append_to_init(updated, [st])

    def leave_Assign(self, original, updated):
        attn = self.plan.attention(self.current_class or "")
        if not attn or not isinstance(updated.value, cst.Call):
            return updated
        call = updated.value
        if dotted(call.func) not in self._attn_names():
            return updated
        pos = [a for a in call.args if a.keyword is None]
        q, k, v = pos[1].value, pos[2].value, pos[3].value
        new_call = cst.Call(func=cst.parse_expression("self.attn"), args=[cst.Arg(q), cst.Arg(k), cst.Arg(v)])
        target = updated.targets[0].target
        if isinstance(target, cst.Tuple):
            names = [n for el in target.elements for n in assigned_names(el.value)]
            self.ctx.extra_taint.setdefault(attn.cls, set()).update(names[1:])
            target = cst.Name(names[0])
        return updated.with_changes(targets=[cst.AssignTarget(target)], value=new_call)

    def _attn_names(self) -> set[str]:
        return attention_call_names(self.ctx.idx)  # the planner's own definition

    def leave_Module(self, original, updated):
        if not getattr(self, "_alibi", False):
            return updated
        src = _ALIBI_SRC.format(world=self.ctx.use("get_tensor_model_parallel_world_size"),
                                rank=self.ctx.use("get_tensor_model_parallel_rank"))
        self.mark(ALIBI_HELPER)
        helper = [st.with_changes(leading_lines=[cst.EmptyLine(), cst.EmptyLine()]) if i == 0 else st
                  for i, st in enumerate(cst.parse_module(src).body)]
        return updated.with_changes(body=[*updated.body, *helper])


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

    def leave_Call(self, original, updated):
        if not self.plan.attention(self.current_class or "") or self.current_function != "forward":
            return updated
        attr = self_call_attr(updated)
        arg = original.args[0].value if len(original.args) == 1 else None
        head_local = isinstance(arg, cst.Name) and arg.value in getattr(self, "_head_locals", ())
        if attr is not None and arg is not None and (self._is_shape_op(arg) or head_local) \
                and attr not in self._linears() \
                and attr not in head_spanning_norms(self.ctx, self.current_class or ""):
            # a per-head module (q_norm over head_dim): split heads around it, keep flat outside
            return self._around_heads(updated, self._strip_shape(arg), "self.head_dim")
        if attr is not None and len(updated.args) == 1 and isinstance(original.args[0].value, cst.Name) \
                and self._per_head_norm(attr):
            # HF's tensor is already split into heads here (by a helper or an earlier view)
            head_dim = self.plan.attention(self.current_class or "").head_dim  # type: ignore[union-attr]
            return self._around_heads(updated, updated.args[0].value, head_dim)
        if self._is_shape_op(updated):
            return updated.func.value  # type: ignore[attr-defined]
        if attr is not None and updated.args and attr in self._layout_helpers():
            self._dropped_helpers.add(attr)
            return updated.args[0].value  # `self._split_heads(q, heads, dim)`: a head layout of q
        return updated

    _LAYOUT_CALLS = frozenset({"view", "reshape", "permute", "transpose", "contiguous", "size", "flatten",
                               "unflatten", "len", "ValueError"})

    def _layout_helpers(self) -> set[str]:
        """Methods that only change the layout of their first argument and return one tensor
        (GPT-J's `_split_heads(x, heads, dim, rotary)` / `_merge_heads`): on flat tokens, the identity."""
        cls = self.current_class or ""
        memo = self.ctx.memo.setdefault("layout_helpers", {})
        if cls not in memo:
            info = self.ctx.idx.classes.get(cls)
            out = set()
            for st in info.node.body.body if info else []:
                if not isinstance(st, cst.FunctionDef) or st.name.value in ("forward", "__init__") \
                        or len(param_names(st)) < 2:
                    continue
                calls = findall(st, m.Call())
                names = {(c.func.attr.value if isinstance(c.func, cst.Attribute) else dotted(c.func))  # type: ignore[attr-defined]
                         for c in calls}
                rets = findall(st, m.Return())
                if calls and names <= self._LAYOUT_CALLS and rets and not any(
                        isinstance(r.value, cst.Tuple) for r in rets):  # type: ignore[attr-defined]
                    out.add(st.name.value)
            memo[cls] = out
        return memo[cls]

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
        return is_norm and attr not in head_spanning_norms(self.ctx, self.current_class or "")

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


class FuseQkv(Rule):
    descend_methods = frozenset()
    code = "PT023"
    name = "fuse-qkv"
    why = (
        "vLLM shards attention by heads with one fused `QKVParallelLinear` (`qkv_proj`), so each "
        "rank holds whole heads of q, k and v and loads the three checkpoint tensors as shards "
        "'q', 'k', 'v'. The three projections are found by dataflow (what feeds the attention "
        "call), not by name. In forward, one `qkv_proj` call and a split by per-rank sizes "
        "replace the three calls. A projection packed per head in the checkpoint (GPT-NeoX's "
        "`chunk(3)`, or a `_split_heads` helper viewing `(..., heads, 3, head_dim)`) is loaded "
        "into [q; k; v] order by load_weights, and the helper goes. So is one grouped per KV head "
        "(`[kv_heads, q_per_kv + 2, head_dim]`: q slots, then one k and one v) in every config arm "
        "of its helper (Falcon's three layouts, porter/analysis/grouped_qkv.py); its KV heads are "
        "read from the projection's width (H + 2 * KV heads of head_dim)."
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
            "        q = self.q_proj(x)\n        k = self.k_proj(x)\n        v = self.v_proj(x)\n"
            "        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)\n"
            "        return out\n",
            "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.head_dim = config.head_dim\n"
            "        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, "
            "config.num_heads, config.num_kv_heads, bias=True, quant_config=quant_config, "
            'prefix=f"{prefix}.qkv_proj")\n'
            "        self.q_size = self.qkv_proj.num_heads * self.head_dim\n"
            "        self.kv_size = self.qkv_proj.num_kv_heads * self.head_dim\n\n"
            "    def forward(self, x):\n        qkv, _ = self.qkv_proj(x)\n"
            "        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)\n"
            "        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)\n"
            "        return out\n",
        ),
        Example(
            "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.head_dim = config.head_dim\n"
            "        self.q_proj = nn.Linear(config.hidden_size, "
            "config.num_heads * self.head_dim)\n"
            "        self.k_proj = nn.Linear(config.hidden_size, "
            "config.num_kv_heads * self.head_dim)\n"
            "        self.v_proj = nn.Linear(config.hidden_size, "
            "config.num_kv_heads * self.head_dim)\n\n    def forward(self, x):\n"
            "        out, _ = attention_interface(self, self.q_proj(x), self.k_proj(x), "
            "self.v_proj(x), None, scaling=1.0)\n        return out\n",
            "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.head_dim = config.head_dim\n"
            "        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, "
            "config.num_heads, config.num_kv_heads, bias=True, quant_config=quant_config, "
            'prefix=f"{prefix}.qkv_proj")\n'
            "        self.q_size = self.qkv_proj.num_heads * self.head_dim\n"
            "        self.kv_size = self.qkv_proj.num_kv_heads * self.head_dim\n\n"
            "    def forward(self, x):\n        qkv, _ = self.qkv_proj(x)\n"
            "        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)\n"
            "        out, _ = attention_interface(self, q, k, v, None, scaling=1.0)\n"
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
            '        self.qkv = QKVParallelLinear(config.hidden_size, self.head_dim, config.hidden_size // self.head_dim, config.hidden_size // self.head_dim, bias=True, quant_config=quant_config, prefix=f"{prefix}.qkv")\n'
            '        self.q_size = self.qkv.num_heads * self.head_dim\n'
            '        self.kv_size = self.qkv.num_kv_heads * self.head_dim\n'
            '        self.q_norm = nn.LayerNorm(self.head_dim)\n'
            '\n'
            '    def forward(self, x):\n'
            '        fused, _ = self.qkv(x)\n'
            '        q, k, v = fused.split([self.q_size, self.kv_size, self.kv_size], dim=-1)\n'
            '        q = self.q_norm(q)\n'
            '        out, _ = attention_interface(self, q, k, v, None)\n'
            '        return out\n',
        ),
        Example(  # grouped per KV head in every config arm of the helper (Falcon): regrouped when loading
            'from torch import nn\n'
            '\n'
            '\n'
            'class Attn(nn.Module):\n'
            '    def __init__(self, config):\n'
            '        super().__init__()\n'
            '        self.num_heads = config.num_heads\n'
            '        self.head_dim = config.head_dim\n'
            '        qkv_out = (config.num_heads + 2 * config.num_kv_heads) * self.head_dim\n'
            '        self.qkv = nn.Linear(config.hidden_size, qkv_out)\n'
            '        self.grouped = config.grouped\n'
            '\n'
            '    def _split_heads(self, x):\n'
            '        b, s, _ = x.shape\n'
            '        if self.grouped:\n'
            '            x = x.view(b, s, -1, self.num_heads // self.num_kv_heads + 2, self.head_dim)\n'
            '            return x[:, :, :, :-2], x[:, :, :, [-2]], x[:, :, :, [-1]]\n'
            '        else:\n'
            '            x = x.view(b, s, self.num_heads, 3, self.head_dim)\n'
            '            return x[..., 0, :], x[..., 1, :], x[..., 2, :]\n'
            '\n'
            '    def forward(self, x):\n'
            '        fused = self.qkv(x)\n'
            '        q, k, v = self._split_heads(fused)\n'
            '        out, _ = attention_interface(self, q, k, v, None)\n'
            '        return out\n',
            'from torch import nn\n'
            '\n'
            '\n'
            'class Attn(nn.Module):\n'
            '    def __init__(self, config):\n'
            '        super().__init__()\n'
            '        self.num_heads = config.num_heads\n'
            '        self.head_dim = config.head_dim\n'
            '        qkv_out = (config.num_heads + 2 * config.num_kv_heads) * self.head_dim\n'
            '        self.qkv = QKVParallelLinear(config.hidden_size, self.head_dim, self.num_heads, (qkv_out // self.head_dim - self.num_heads) // 2, bias=True, quant_config=quant_config, prefix=f"{prefix}.qkv")\n'
            '        self.q_size = self.qkv.num_heads * self.head_dim\n'
            '        self.kv_size = self.qkv.num_kv_heads * self.head_dim\n'
            '        self.grouped = config.grouped\n'
            '\n'
            '    def forward(self, x):\n'
            '        fused, _ = self.qkv(x)\n'
            '        q, k, v = fused.split([self.q_size, self.kv_size, self.kv_size], dim=-1)\n'
            '        out, _ = attention_interface(self, q, k, v, None)\n'
            '        return out\n',
        ),
    ]

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        attn = self.plan.attention(cls or "")
        if not attn or len(self.scope) != 1:
            return updated
        if updated.name.value == "__init__":
            return self._init(attn, updated)
        if attn.packed and updated.name.value == self._split_helper(attn):
            return cst.RemoveFromParent()  # the per-head split it did is load_weights' permutation now
        if updated.name.value == "forward":
            return self._forward_packed(attn, updated) if attn.packed else self._forward(attn, updated)
        return updated

    def _split_helper(self, attn) -> str | None:
        """The method splitting the packed output into heads: per head `(heads, 3, head_dim)`, or
        grouped per KV head in every config arm (Falcon): its layout is load_weights' job."""
        info = self.ctx.idx.classes[attn.cls]
        if attn.grouped:
            split = grouped_split(info, attn.q, attn.head_dim)
            return split.helper if split else None
        return per_head_split_helper(info, attn.q)

    def _forward_packed(self, attn, fn: cst.FunctionDef) -> cst.FunctionDef:
        """`qkv = self.qkv_proj(x); q = qkv[..., :Q]; k = ...; v = ...` -> one split by per-rank sizes."""
        out_name, names, body, placed = None, [], [], False
        split_helper = self._split_helper(attn)
        stmts: list[cst.BaseStatement] = []
        for st in fn.body.body:
            if attn.interleaved_unless and m.matches(st, m.If(test=m.Attribute(
                    value=m.Name("self"), attr=m.Name(attn.interleaved_unless)))):
                # both arms split the same projection; the per-head arm's layout is load_weights' job
                stmts.extend(st.body.body)  # type: ignore[attr-defined]
                continue
            stmts.append(st)
        for st in stmts:
            split_call = packed_split_call(st, attn.q)
            if split_call is not None:
                x = findall(split_call, m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(attn.q))))[0]
                names = [e.value.value for e in st.body[0].targets[0].target.elements]  # type: ignore[attr-defined]
                body.append(cst.SimpleStatementLine([cst.Assign(
                    targets=[cst.AssignTarget(cst.parse_expression("qkv, _"))], value=x)]))
                body.append(cst.parse_statement(
                    f"{names[0]}, {names[1]}, {names[2]} = qkv.split("
                    "[self.q_size, self.kv_size, self.kv_size], dim=-1)\n"))
                placed = True
                continue
            if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())], value=m.Call(
                    func=m.Attribute(value=m.Name("self"), attr=m.Name(attn.q))))])):
                out_name = st.body[0].targets[0].target.value  # type: ignore[attr-defined]
                # engine linears return (output, bias)
                body.append(st.with_changes(body=[st.body[0].with_changes(targets=[cst.AssignTarget(  # type: ignore[attr-defined]
                    cst.parse_expression(f"{out_name}, _"))])]))
                continue
            if out_name and m.matches(st, m.SimpleStatementLine(body=[m.Assign(
                    targets=[m.AssignTarget(m.Tuple())], value=m.Call(func=m.Attribute(
                        value=m.Name(out_name), attr=m.Name("chunk"))) | m.Call(func=m.Attribute(
                            value=m.Name("self"), attr=m.Name(split_helper or "")),
                            args=[m.Arg(m.Name(out_name))]))])):
                # per-head interleaved (loaded into q/k/v order by load_weights): split by sizes
                names = [e.value.value for e in st.body[0].targets[0].target.elements]  # type: ignore[attr-defined]
                body.append(cst.parse_statement(
                    f"{names[0]}, {names[1]}, {names[2]} = {out_name}.split("
                    "[self.q_size, self.kv_size, self.kv_size], dim=-1)\n"))
                placed = True
                continue
            if out_name and m.matches(st, m.SimpleStatementLine(body=[m.Assign(
                    targets=[m.AssignTarget(m.Name())], value=m.Subscript(value=m.Name(out_name)))])):
                names.append(st.body[0].targets[0].target.value)  # type: ignore[attr-defined]
                if len(names) == 3 and not placed:
                    body.append(cst.parse_statement(
                        f"{names[0]}, {names[1]}, {names[2]} = {out_name}.split("
                        "[self.q_size, self.kv_size, self.kv_size], dim=-1)\n"))
                    placed = True
                continue
            body.append(st)
        if not placed:
            raise self.ctx.idx.error("cannot port attention: packed q/k/v slices not found in forward",
                                     construct=f"{attn.cls}.forward", rule=self.name)
        self.mark(f"{attn.cls}.forward")
        return fn.with_changes(body=fn.body.with_changes(body=body))

    def _init(self, attn, fn: cst.FunctionDef) -> cst.FunctionDef:
        body, done = [], False
        for st in fn.body.body:
            if any(_is_assign_of(st, a) for a in (attn.q, attn.k, attn.v)):
                if not done:
                    name = attn.q if attn.packed else "qkv_proj"
                    body += [
                        cst.parse_statement(
                            f"self.{name} = {self.ctx.use('QKVParallelLinear')}({attn.hidden_size}, "
                            f"{attn.head_dim}, {attn.num_heads}, {attn.num_kv_heads}, bias={attn.bias}, "
                            f"quant_config=quant_config, prefix=f\"{{prefix}}.{name}\")\n"
                        ),
                        cst.parse_statement(f"self.q_size = self.{name}.num_heads * {attn.head_dim}\n"),
                        cst.parse_statement(f"self.kv_size = self.{name}.num_kv_heads * {attn.head_dim}\n"),
                    ]
                    done = True
                continue
            body.append(st)
        self.mark(f"{attn.cls}.__init__")
        return fn.with_changes(body=fn.body.with_changes(body=body))

    def _forward(self, attn, fn: cst.FunctionDef) -> cst.FunctionDef:
        names = {attn.q: "q", attn.k: "k", attn.v: "v"}
        body = list(fn.body.body)
        first = None
        x_src = None
        for i, st in enumerate(body):
            calls = [c for c in findall(st, m.Call()) if self_call_attr(c) in names]
            if calls and first is None:
                first = i
                x_src = calls[0].args[0].value  # type: ignore[attr-defined]
        if first is None:
            raise self.ctx.idx.error("cannot port attention: q/k/v calls not found in forward",
                                     construct=f"{attn.cls}.forward", rule=self.name)
        # `query_states = self.q_proj(x)` (after flatten-heads) binds the split target directly
        targets = dict(names)
        keep: list[tuple[int, cst.BaseStatement]] = []
        for i, st in enumerate(body):
            if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())], value=m.Call())])):
                call = st.body[0].value  # type: ignore[attr-defined]
                attr = self_call_attr(call)
                if attr in names and len(call.args) == 1:
                    targets[attr] = st.body[0].targets[0].target.value  # type: ignore[attr-defined]
                    continue
            keep.append((i, st))

        class _Replace(cst.CSTTransformer):
            def leave_Call(self, original, updated):
                attr = self_call_attr(updated)
                if attr in names:
                    return cst.Name(targets[attr])
                return updated

        qkv_stmt = cst.SimpleStatementLine([cst.Assign(
            targets=[cst.AssignTarget(cst.parse_expression("qkv, _"))],
            value=cst.Call(func=cst.parse_expression("self.qkv_proj"), args=[cst.Arg(x_src)]),
        )])
        split = cst.parse_statement(
            f"{targets[attn.q]}, {targets[attn.k]}, {targets[attn.v]} = "
            "qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)\n"
        )
        before = [st for i, st in keep if i < first]
        after = [st.visit(_Replace()) for i, st in keep if i >= first]
        out = before + [qkv_stmt, split] + after
        self.mark(f"{attn.cls}.forward")
        return fn.with_changes(body=fn.body.with_changes(body=out))


class PartialRotary(Rule):
    descend_methods = frozenset()
    code = "PT019"
    name = "partial-rotary"
    why = (
        "Models with partial rotary (`partial_rotary_factor` < 1) split each head into a rotated "
        "and a passed-through part, rotate the first and concatenate them back. The engine's "
        "`get_rope` does that split itself from `rope_parameters`, on whole flat q/k: the split, "
        "the concatenation and the renames disappear and the rotary call takes q and k whole."
    )
    examples = [
        Example(
            "class A(nn.Module):\n    def forward(self, x, cos, sin):\n        q = self.q(x)\n        k = self.k(x)\n"
            "        q_rot, q_pass = (q[..., : self.n], q[..., self.n :])\n"
            "        k_rot, k_pass = (k[..., : self.n], k[..., self.n :])\n"
            "        q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot, cos, sin)\n"
            "        q = torch.cat((q_rot, q_pass), dim=-1)\n        k = torch.cat((k_rot, k_pass), dim=-1)\n"
            "        return q, k\n",
            "class A(nn.Module):\n    def forward(self, x, cos, sin):\n        q = self.q(x)\n        k = self.k(x)\n"
            "        q, k = apply_rotary_pos_emb(q, k, cos, sin)\n        return q, k\n",
        )
    ]

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        if not self.kept(cls) or len(self.scope) != 1 or updated.name.value != "forward":
            return updated
        parts: dict[str, str] = {}  # rot/pass name -> the whole tensor's name
        body = []
        for st in updated.body.body:
            split = self._split(st)
            if split:
                parts.update(split)
                continue
            body.append(st)
        if not parts:
            return updated
        out = []
        for st in body:
            if self._rejoin(st, parts):
                continue
            out.append(st)
        rename = {k: v for k, v in parts.items()}

        class _Rename(cst.CSTTransformer):
            def leave_Name(self, o, u):
                return u.with_changes(value=rename[u.value]) if u.value in rename else u

        out = [st.visit(_Rename()) for st in out]
        self.mark(f"{cls}.forward")
        return updated.with_changes(body=updated.body.with_changes(body=out))

    @staticmethod
    def _split(st) -> dict[str, str] | None:
        pattern = m.SimpleStatementLine(body=[m.Assign(
            targets=[m.AssignTarget(m.Tuple(elements=[m.Element(m.Name()), m.Element(m.Name())]))],
            value=m.Tuple(elements=[m.Element(m.Subscript(value=m.Name())), m.Element(m.Subscript(value=m.Name()))]),
        )])
        if not m.matches(st, pattern):
            return None
        assign = st.body[0]
        rot, keep = (e.value.value for e in assign.targets[0].target.elements)
        a, b = (e.value for e in assign.value.elements)
        if a.value.value != b.value.value:
            return None
        sa, sb = a.slice[-1].slice, b.slice[-1].slice
        if not (isinstance(sa, cst.Slice) and isinstance(sb, cst.Slice) and sa.lower is None and sb.upper is None):
            return None
        return {rot: a.value.value, keep: a.value.value}

    @staticmethod
    def _rejoin(st, parts: dict[str, str]) -> bool:
        pattern = m.SimpleStatementLine(body=[m.Assign(
            targets=[m.AssignTarget(m.Name())],
            value=m.Call(func=m.Attribute(value=m.Name("torch"), attr=m.Name("cat")),
                         args=[m.Arg(m.Tuple()), m.ZeroOrMore()]))])
        if not m.matches(st, pattern):
            return False
        assign = st.body[0]
        names = [e.value.value for e in assign.value.args[0].value.elements if isinstance(e.value, cst.Name)]
        target = assign.targets[0].target.value
        return len(names) == 2 and all(parts.get(n) == target for n in names)
