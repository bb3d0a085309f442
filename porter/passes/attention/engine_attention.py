"""PT021 engine-attention: the rule `EngineAttention`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst

from porter.analysis.cstutil import assigned_names, dotted
from porter.passes._edit import append_to_init
from porter.passes.base import Example, Rule
from porter.analysis.layouts import attention_call_names

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
        return append_to_init(updated, [st])

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
