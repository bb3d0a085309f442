"""PT294 kv-sharing-load: the rule `KvSharingLoad`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.passes.base import Example, Rule
from porter.plan.model import AttentionPlan

_LM = (
    "from torch import nn\n\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)\n\n\n"
    "class AForCausalLM(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.model = AModel(config)\n\n    def load_weights(self, weights):\n"
    "        stacked_params_mapping = [(\".qkv_proj\", \".q_proj\", \"q\"), (\".qkv_proj\", \".k_proj\", \"k\")]\n"
    "        params_dict = dict(self.named_parameters())\n"
    "        for name, loaded_weight in weights:\n"
    "            for param_name, shard_name, shard_id in stacked_params_mapping:\n"
    "                if shard_name not in name:\n                    continue\n"
    "{skip}"
    "                name = name.replace(shard_name, param_name)\n                param = params_dict[name]\n"
    "                param.weight_loader(param, loaded_weight, shard_id)\n                break\n"
    "            else:\n                param = params_dict[name]\n"
)
_SKIP = (
    "                if name.replace(shard_name, param_name) not in params_dict:\n"
    "                    continue  # a layer reading another layer's k/v projects q alone (not fused)\n"
)


class KvSharingLoad(Rule):
    descend_methods = frozenset()
    code = "PT294"
    name = "kv-sharing-load"
    why = (
        "A layer that reads another layer's k/v has a `q_proj` of its own and no fused `qkv_proj` (PT293), "
        "so the stacked mapping must not rename its checkpoint's `q_proj` into one: load_weights skips a "
        "stacked entry whose fused name the model does not have, and the weight loads under its own name "
        "(as vLLM's gemma4 loads its KV-shared layers)."
    )
    examples = [Example(_LM.format(skip=""), _LM.format(skip=_SKIP), seed={"attentions": [AttentionPlan(
        cls="Attn", q="q_proj", k="k_proj", v="v_proj", o=None, head_dim="self.head_dim", num_heads="config.num_heads",
        num_kv_heads="config.num_kv_heads", hidden_size="config.hidden_size", bias="False", scale="1.0",
        sliding_window=None, softcap=None, rope=None, rope_helper=None, line=4, kv_shared_when="self.shared")]})]

    @classmethod
    def classes(cls, ctx) -> set[str] | None:
        return {ctx.plan.causal_lm}

    @classmethod
    def applies(cls, ctx) -> bool:
        return any(a.kv_shared_when for a in ctx.plan.attentions)

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        if len(self.scope) != 1 or updated.name.value != "load_weights":
            return updated
        out = updated.visit(_Skip())
        if out.deep_equals(updated):
            raise self.ctx.idx.error("cannot port KV sharing: no stacked-mapping loop in load_weights",
                                     construct=f"{cls}.load_weights", rule=self.name)
        self.mark(f"{cls}.load_weights")
        return out


class _Skip(cst.CSTTransformer):
    """After `if shard_name not in name: continue` in the stacked loop, the skip of a fused name the
    model lacks."""

    def leave_IndentedBlock(self, original, updated):
        guard = m.If(test=m.Comparison(left=m.Name("shard_name"),
                                       comparisons=[m.ComparisonTarget(m.NotIn(), m.Name("name"))]))
        body: list[cst.BaseStatement] = []
        for st in updated.body:
            body.append(st)
            if m.matches(st, guard):
                body.append(cst.parse_statement(_SKIP.replace("                ", "")))
        return updated.with_changes(body=body) if len(body) != len(updated.body) else updated
