"""PT292 value-from-key: the rule `ValueFromKey`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.passes.base import Example, Rule
from porter.plan.model import AttentionPlan

_LOOP = (
    "        for name, loaded_weight in weights:\n"
    "            for param_name, shard_name, shard_id in stacked_params_mapping:\n"
    "                if shard_name not in name:\n                    continue\n"
    "                name = name.replace(shard_name, param_name)\n                param = params_dict[name]\n"
    "                param.weight_loader(param, loaded_weight, shard_id)\n"
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
    "        self.model = AModel(config)\n\n    def load_weights(self, weights):\n"
    "        stacked_params_mapping = [(\".qkv_proj\", \".q_proj\", \"q\"), (\".qkv_proj\", \".k_proj\", \"k\"), "
    "(\".qkv_proj\", \".v_proj\", \"v\")]\n        params_dict = dict(self.named_parameters())\n" + _LOOP
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
        "fused `qkv_proj` and load_weights loads the checkpoint's k_proj into both its k and its v rows, so "
        "v is k's projection exactly: forward takes the v of the split, and the loader tests the layer's own "
        "attribute on the module the weight belongs to."
    )
    examples = [Example(
        _HEAD + "        value = v if self.v_proj is not None else k\n        return self.attn(q, k, value)\n" + _LM,
        _HEAD + "        value = v\n        return self.attn(q, k, value)\n" + _LM.replace(
            "                param.weight_loader(param, loaded_weight, shard_id)\n",
            "                param.weight_loader(param, loaded_weight, shard_id)\n"
            "                if shard_id == \"k\" and self.get_submodule(name.rsplit(\".\", 2)[0]).k_is_v:\n"
            "                    param.weight_loader(param, loaded_weight, \"v\")  # v is k's projection here\n"),
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
        if cls == self.plan.causal_lm and updated.name.value == "load_weights":
            tests = {a.v_from_k for a in self.plan.attentions if a.v_from_k}
            if len(tests) != 1:
                raise self.ctx.idx.error("cannot port values taken from the keys: attention classes test it "
                                         "differently", construct=f"{cls}.load_weights", rule=self.name)
            test = cst.parse_expression(tests.pop()).visit(_OnModule())
            load = m.SimpleStatementLine(body=[m.Expr(m.Call(func=m.Attribute(attr=m.Name("weight_loader")),
                                                             args=[m.Arg(), m.Arg(), m.Arg(m.Name("shard_id"))]))])
            out = updated.visit(_AlsoV(load, test))
            if out.deep_equals(updated):
                raise self.ctx.idx.error("cannot port values taken from the keys: no stacked shard load in "
                                         "load_weights", construct=f"{cls}.load_weights", rule=self.name)
            self.mark(f"{cls}.load_weights")
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


class _AlsoV(cst.CSTTransformer):
    def __init__(self, load: m.BaseMatcherNode, test: cst.BaseExpression) -> None:
        super().__init__()
        self.load, self.test = load, test

    def leave_IndentedBlock(self, original, updated):
        body: list[cst.BaseStatement] = []
        for st in updated.body:
            body.append(st)
            if m.matches(st, self.load):
                also = cst.parse_statement('if shard_id == "k" and TEST:\n'
                                           '    param.weight_loader(param, loaded_weight, "v")  # v is k\'s projection here\n')
                body.append(also.with_changes(test=cst.parse_expression(
                    'shard_id == "k" and X').with_changes(right=self.test)))
        return updated.with_changes(body=body) if len(body) != len(updated.body) else updated

