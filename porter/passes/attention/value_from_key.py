"""PT292 value-from-key: the rule `ValueFromKey`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.passes._edit import FILTER, add_to_filter
from porter.passes.base import Example, Rule
from porter.plan.model import AttentionPlan

_LOOP = (
    "        for name, loaded_weight in weights:\n{also}"
    "            yield name, loaded_weight\n"
)
_ALSO = (
    "            if \".k_proj.\" in name and self.get_submodule(name.rsplit(\".\", 2)[0]).k_is_v:\n"
    "                # v is k's projection here: the k tensor also loads into the v rows\n"
    "                yield name.replace(\".k_proj.\", \".v_proj.\"), loaded_weight.detach()\n"
)
_HEAD = (
    "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.k_is_v = config.k_eq_v\n\n"
    "    def forward(self, x):\n        qkv, _ = self.qkv_proj(x)\n"
    "        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)\n"
)
_LM = (
    "\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)\n\n\n"
    "class AForCausalLM(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.model = AModel(config)\n\n    def port_weights(self, weights):\n" + _LOOP
)
_PLAN = AttentionPlan(
    cls="Attn", q="q_proj", k="k_proj", v="v_proj", o=None, head_dim="self.head_dim", num_heads="config.num_heads",
    num_kv_heads="config.num_kv_heads", hidden_size="config.hidden_size", bias="False", scale="1.0",
    sliding_window=None, softcap=None, rope=None, rope_helper=None, line=4, v_from_k="self.k_is_v")


class ValueFromKey(Rule):
    descend_methods = frozenset()
    code = "PT292"
    name = "value-from-key"
    why = (
        "Gemma-4's `attention_k_eq_v` full-attention layers build no value projection (`self.v_proj = "
        "nn.Linear(...) if not self.use_alternative_attention else None`) and take the keys' projection, "
        "before its norm and rotary, as values (`v = self.v_proj(x) if self.v_proj is not None else k`), "
        "found by dataflow (porter/analysis/value_from_key.py). As in vLLM's gemma4, such a layer keeps the "
        "fused `qkv_proj` and the filter in front of the loader (`port_weights`) hands the checkpoint's k_proj "
        "on a second time as the v shard, so its k and its v rows both hold it and v is k's projection exactly: "
        "forward takes the v of the split, and the filter tests the layer's own attribute on the module the "
        "weight belongs to."
    )
    examples = [Example(
        _HEAD + "        value = v if self.v_proj is not None else k\n        return self.attn(q, k, value)\n" + _LM.replace("{also}", ""),
        _HEAD + "        value = v\n        return self.attn(q, k, value)\n" + _LM.replace("{also}", _ALSO),
        seed={"attentions": [_PLAN], "classes": ["Attn", "AModel", "AForCausalLM"]})]

    @classmethod
    def classes(cls, ctx) -> set[str] | None:
        return {a.cls for a in ctx.plan.attentions if a.v_from_k} | {ctx.plan.causal_lm}

    @classmethod
    def applies(cls, ctx) -> bool:
        return any(a.v_from_k for a in ctx.plan.attentions)

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        if len(self.scope) != 1:
            return updated
        attn = self.plan.attention(cls or "")
        if attn is not None and attn.v_from_k and updated.name.value == "forward":
            self.mark(f"{cls}.forward")
            return updated.visit(_PickV(attn.v))
        if cls == self.plan.causal_lm and updated.name.value == FILTER:
            tests = {a.v_from_k for a in self.plan.attentions if a.v_from_k}
            pairs = {(a.k, a.v) for a in self.plan.attentions if a.v_from_k}
            if len(tests) != 1 or len(pairs) != 1:
                raise self.ctx.idx.error("cannot port values taken from the keys: attention classes test it "
                                         "differently", construct=f"{cls}.{FILTER}", rule=self.name)
            (k, v), = pairs
            test = cst.parse_expression(tests.pop()).visit(_OnModule())
            also = cst.parse_statement(_ALSO.replace("            ", "", 1).replace("\n            ", "\n")
                                       .replace(".k_proj.", f".{k}.").replace(".v_proj.", f".{v}."))
            also = also.with_changes(test=also.test.with_changes(right=test))  # type: ignore[attr-defined]
            out = add_to_filter(updated, [also])
            if out is None:
                raise self.ctx.idx.error("cannot port values taken from the keys: no filter in front of the "
                                         "loader", construct=f"{cls}.{FILTER}", rule=self.name)
            self.mark(f"{cls}.{FILTER}")
            return out
        return updated


class _PickV(cst.CSTTransformer):
    """`v if self.v_proj is not None else k` -> `v` (the v rows hold k's weights where v_proj is absent)."""

    def __init__(self, v: str) -> None:
        super().__init__()
        self.v = v

    def leave_IfExp(self, original, updated):
        tested = m.Comparison(left=m.Attribute(value=m.Name("self"), attr=m.Name(self.v)))
        if m.matches(updated.test, tested):
            return updated.body
        return updated


class _OnModule(cst.CSTTransformer):
    def leave_Name(self, original, updated):
        if updated.value == "self":
            return cst.parse_expression('self.get_submodule(name.rsplit(".", 2)[0])')
        return updated
