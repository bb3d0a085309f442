"""PT322 lora-interface: the rule `LoraInterface`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.passes.base import Example, Rule
from porter.rules_data import lora_roles

_LM = (
    "from torch import nn\n\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n"
    "        super().__init__()\n        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)\n\n\n"
    "class AForCausalLM({bases}):\n{attrs}"
    "    packed_modules_mapping = {{'qkv_proj': ['q_proj', 'k_proj', 'v_proj']}}\n"
    "{embedding}\n"
    "    def __init__(self, config):\n        super().__init__()\n        self.transformer = AModel(config)\n"
    "        self.head = ParallelLMHead(config.vocab_size, config.hidden_size)\n"
)


class LoraInterface(Rule):
    descend_methods = frozenset()
    code = "PT322"
    name = "lora-interface"
    why = (
        "vLLM serves LoRA adapters (`enable_lora=True`) only for a model class that declares "
        "SupportsLoRA; the engine's own class of a model type declares it (rules/lora.yaml lists "
        "those types), with `embedding_modules` naming its token embedding (`input_embeddings`) and "
        "head (`output_embeddings`) where it does. The port declares the same, naming its own "
        "attributes (GPT-2's `wte`, a head the file calls otherwise), and keeps the "
        "packed_modules_mapping earlier rules wrote for its fused projections. A type whose native "
        "class takes no adapters is left as it is: the engine refuses LoRA for it."
    )
    examples = [
        Example(_LM.format(bases="nn.Module", attrs="", embedding=""),
                _LM.format(bases="nn.Module, SupportsLoRA", attrs="", embedding=(
                    "    embedding_modules = {'wte': 'input_embeddings', 'head': 'output_embeddings'}\n")),
                seed={"model_type": "llama", "lm_head": "head"}),
    ]

    @classmethod
    def applies(cls, ctx) -> bool:
        return lora_roles(ctx.plan.model_type) is not None

    @classmethod
    def classes(cls, ctx):
        return {ctx.plan.causal_lm}

    def leave_ClassDef(self, original, updated):
        super().leave_ClassDef(original, updated)
        if self.scope or updated.name.value != self.plan.causal_lm:
            return updated
        roles = lora_roles(self.plan.model_type) or ()
        names = {"input_embeddings": self.plan.embed_path.rsplit(".", 1)[-1], "output_embeddings": self.plan.lm_head}
        if any(not names[r] for r in roles):
            return updated
        body = list(updated.body.body)
        if roles:
            entries = ", ".join(f"{names[r]!r}: {r!r}" for r in roles)
            attr = cst.parse_statement(f"embedding_modules = {{{entries}}}\n")
            packed = m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name("packed_modules_mapping"))])])
            at = next((i + 1 for i, s in enumerate(body) if m.matches(s, packed)), 0)
            body.insert(at, attr)
        bases = [*updated.bases, cst.Arg(cst.Name(self.ctx.use("SupportsLoRA")))]
        return updated.with_changes(bases=bases, body=updated.body.with_changes(body=body))
