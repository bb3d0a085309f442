"""PT297 trained-length-guard: the rule `TrainedLengthGuard`; its `why` says what it rewrites and why."""

from __future__ import annotations

import json

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import findall
from porter.passes.base import Example, Rule


class TrainedLengthGuard(Rule):
    descend_methods = frozenset()
    code = "PT297"
    name = "trained-length-guard"
    why = (
        "What PT300 dropped is the identity only while every position is within a trained length "
        "(`config.seq_length`): beyond it Qwen-1's dynamic NTK raises the rotary base and logn attention "
        "scales the query, which the port does not compute. The causal LM's __init__ refuses, at load and "
        "with the reason, an engine whose max_model_len exceeds that field, so the port never runs where "
        "it would differ from the source."
    )
    examples = [
        Example(
            "class ALMHeadModel(nn.Module):\n"
            "    def __init__(self, *, vllm_config, prefix=''):\n        super().__init__()\n"
            "        config = vllm_config.model_config.hf_config\n        self.config = config\n",
            "class ALMHeadModel(nn.Module):\n"
            "    def __init__(self, *, vllm_config, prefix=''):\n        super().__init__()\n"
            "        config = vllm_config.model_config.hf_config\n"
            "        if vllm_config.model_config.max_model_len > config.seq_length:\n"
            "            raise ValueError(\"porter: max_model_len %d exceeds config.seq_length %d, the trained length "
            "within which the port computes logn attention scale of the query (Attn.forward: if self.use_logn_attn)"
            " exactly: beyond it the source computes what the port does not\" % (vllm_config.model_config."
            "max_model_len, config.seq_length))\n"
            "        self.config = config\n",
            seed={"causal_lm": "ALMHeadModel",
                  "trained_length": {"config.seq_length": [
                      "logn attention scale of the query (Attn.forward: if self.use_logn_attn)"]}},
        ),
    ]

    @classmethod
    def applies(cls, ctx) -> bool:
        return bool(getattr(ctx, "trained_length", None))

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        if len(self.scope) != 1 or updated.name.value != "__init__" or cls != self.plan.causal_lm:
            return updated
        body = list(updated.body.body)
        at = next((i for i, st in enumerate(body) if findall(st, m.Assign(value=m.Attribute(
            value=m.Attribute(value=m.Name("vllm_config"), attr=m.Name("model_config")), attr=m.Name("hf_config"))))), None)
        if at is None:
            return updated
        cfg = body[at].body[0].targets[0].target.value  # type: ignore[attr-defined]
        guards = []
        for field, whats in sorted(self.ctx.trained_length.items()):
            mine = field.replace("config.", f"{cfg}.", 1)
            why = (f"porter: max_model_len %d exceeds {field} %d, the trained length within which the port "
                   f"computes {'; '.join(whats)} exactly: beyond it the source computes what the port does not")
            guards.append(cst.parse_statement(
                f"if vllm_config.model_config.max_model_len > {mine}:\n"
                f"    raise ValueError({json.dumps(why)} % (vllm_config.model_config.max_model_len, {mine}))\n"))
        self.mark(f"{cls}.__init__")
        return updated.with_changes(body=updated.body.with_changes(body=[*body[:at + 1], *guards, *body[at + 1:]]))
