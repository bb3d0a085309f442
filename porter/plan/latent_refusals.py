"""Refusals of multi-head latent attention (rule latent-attention, PT280): what the engine's MLA
layer cannot compute, and model types porter has not verified it under."""

from __future__ import annotations

from typing import TYPE_CHECKING

from porter.analysis.latent_around import LatentAround, latent_around
from porter.analysis.latent_attention import latent_kv_roles
from porter.analysis.latent_extras import extras_beyond, latent_extras
from porter.plan.refusals import _ATTN_HEAD, Refusal

if TYPE_CHECKING:
    from porter.analysis.index import ClassInfo
    from porter.plan.model import PlanningContext as Planner, PortPlan

_LATENT_FILE = _ATTN_HEAD + (
    "class Norm(nn.Module):\n    def __init__(self, n):\n        super().__init__()\n"
    "        self.weight = nn.Parameter(torch.ones(n))\n\n    def forward(self, x):\n        return self.weight * x\n\n\n"
    "class Attn(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.q_proj = nn.Linear(config.hidden_size, config.heads * 96, bias=False)\n"
    "        self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, config.kv_lora_rank + 64, bias=False)\n"
    "        self.kv_a_layernorm = Norm(config.kv_lora_rank)\n"
    "        self.kv_b_proj = nn.Linear(config.kv_lora_rank, config.heads * 64, bias=False)\n"
    "        self.o_proj = nn.Linear(config.heads * 32, config.hidden_size, bias=False)\n\n"
    "    def forward(self, x, mask):\n        q = self.q_proj(x)\n"
    "        q_pass, q_rot = torch.split(q, [32, 64], dim=-1)\n        c = self.kv_a_proj_with_mqa(x)\n"
    "        kv, k_rot = torch.split(c, [config.kv_lora_rank, 64], dim=-1)\n"
    "        kv = self.kv_b_proj(self.kv_a_layernorm(kv))\n        k, v = torch.split(kv, [32, 32], dim=-1)\n"
    "        out, _ = attention_interface(self, q, k, v, mask, scaling=0.1)\n        return self.o_proj(out)\n\n\n"
    "class Model(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.attn = Attn(config)\n\n\n"
    "class XForCausalLM(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.model = Model(config)\n        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)\n"
)

LATENT_MODEL_TYPE = Refusal(
    "cannot port latent attention under model type {model_type!r}: not verified for it (the engine's MLA "
    "layer serves only the DeepSeek-style model types it lists, other types get ordinary attention over "
    "the decompressed keys and values; porter lists the types it verified each way: rules/hf_strip.yaml "
    "latent_attention_model_types, latent_decompressed_model_types)",
    _LATENT_FILE,
    "<example>:14: cannot port latent attention under model type 'example': not verified for it (the "
    "engine's MLA layer serves only the DeepSeek-style model types it lists, other types get ordinary "
    "attention over the decompressed keys and values; porter lists the types it verified each way: "
    "rules/hf_strip.yaml latent_attention_model_types, latent_decompressed_model_types) in class Attn "
    "(rule latent-attention)",
    rule="latent-attention",
    whole_file=True,
)


LATENT_EXTRAS = Refusal(
    "cannot port latent attention: the engine's MLA layer (MultiHeadLatentAttentionWrapper) computes the "
    "query, the KV latent, its up-projection, rope, attention and the output projection, nothing between "
    "them; this class also uses {extras}",
    _LATENT_FILE.replace("        self.o_proj = nn.Linear(config.heads * 32",
                         "        self.g_proj = nn.Linear(config.hidden_size, config.heads, bias=False)\n"
                         "        self.o_proj = nn.Linear(config.heads * 32")
    .replace("return self.o_proj(out)", "return self.o_proj(out * self.g_proj(x))"),
    "<example>:14: cannot port latent attention: the engine's MLA layer (MultiHeadLatentAttentionWrapper) "
    "computes the query, the KV latent, its up-projection, rope, attention and the output projection, "
    "nothing between them; this class also uses module self.g_proj in class Attn (rule latent-attention)",
    rule="latent-attention",
    whole_file=True,
)


def latent_model_type(p: Planner, plan: PortPlan) -> None:
    """Latent attention only where the engine's MLA layer computes all of it, and only under the model
    types porter verified it for (the engine builds its MLA cache only for those it lists)."""
    for la in plan.latent_attentions:
        info = p.idx.classes[la.cls]
        around = None
        if p.model_type in p.table.latent_decompressed_model_types:
            # computed over the decompressed keys/values (PT281), ordinary code around the projections
            # is kept: a per-head gate, rescaled latents, a rope-key norm, an indexer identity within a bound
            around = latent_around(p.idx, info, la)
            if around != LatentAround():
                plan.latent_arounds[la.cls] = around
        if extras := latent_extras(info, la, around.roles() if around else set()):
            raise LATENT_EXTRAS.error(p, info.node, f"class {la.cls}", extras=", ".join(extras))
        if p.model_type not in p.table.latent_attention_model_types | p.table.latent_decompressed_model_types:
            raise LATENT_MODEL_TYPE.error(p, info.node, f"class {la.cls}", model_type=p.model_type)


def latent_kv_without_mla(p: Planner, info: ClassInfo) -> None:
    """A class whose keys and values come from a latent (a projection split into latent + rope, a norm
    over the latent, an up-projection) but which latent attention's reader did not take as a whole:
    when it holds modules the engine's MLA layer has no place for (a query fused with an output gate,
    a sparse-attention indexer), the line names them rather than the q/k/v projections it lacks."""
    roles = latent_kv_roles(p.idx, info)
    if roles is not None and (extras := extras_beyond(info, roles)):
        raise LATENT_EXTRAS.error(p, info.node, f"class {info.name}", extras=", ".join(extras))
