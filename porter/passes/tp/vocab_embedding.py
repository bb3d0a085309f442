"""PT026 vocab-embedding: the rule `VocabEmbedding`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, dotted, self_attr
from porter.passes.base import Example, Rule


class VocabEmbedding(Rule):
    descend_methods = frozenset({"__init__"})
    code = "PT026"
    name = "vocab-embedding"
    why = (
        "The token embedding (`nn.Embedding(config.vocab_size, ...)`) becomes "
        "`VocabParallelEmbedding`: the vocabulary is padded and split across ranks. Other "
        "embeddings (learned positions) stay replicated. `padding_idx` is a training detail."
    )
    examples = [
        Example(
            "from torch import nn\n\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, "
            "config.pad_token_id)\n"
            "        self.embed_positions = nn.Embedding(config.max_position_embeddings, "
            "config.hidden_size)\n",
            "from torch import nn\n\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, "
            'config.hidden_size, quant_config=quant_config, prefix=f"{prefix}.embed_tokens")\n'
            "        self.embed_positions = nn.Embedding(config.max_position_embeddings, "
            "config.hidden_size)\n",
        ),
    ]

    def leave_Assign(self, original, updated):
        if self.current_function != "__init__" or len(updated.targets) != 1:
            return updated
        attr = self_attr(updated.targets[0].target)
        if f"{self.current_class}.{attr}" not in self.plan.vocab_embeddings:
            return updated
        if dotted(updated.value.func) in self.plan.vocab_embedding_classes:  # type: ignore[attr-defined]
            return updated  # the subclass itself is rewritten (leave_ClassDef)
        args = [a for a in updated.value.args if a.keyword is None][:2]  # type: ignore[attr-defined]
        new = cst.parse_expression(
            f"{self.ctx.use('VocabParallelEmbedding')}({code(args[0].value)}, {code(args[1].value)}, "
            f"quant_config=quant_config, prefix=f\"{{prefix}}.{attr}\")")
        return updated.with_changes(value=new)


    def leave_ClassDef(self, original, updated):
        super().leave_ClassDef(original, updated)
        if self.scope or updated.name.value not in self.plan.vocab_embedding_classes:
            return updated
        name = self.ctx.use("VocabParallelEmbedding")
        bases = [b.with_changes(value=cst.Name(name)) if self.ctx.idx.qualify(dotted(b.value)) == "torch.nn.Embedding"
                 else b for b in updated.bases]

        class _Super(cst.CSTTransformer):
            # super().__init__(num, dim, padding_idx) -> super().__init__(num, dim)
            def leave_Call(self, o, u):
                if m.matches(u, m.Call(func=m.Attribute(value=m.Call(func=m.Name("super")), attr=m.Name("__init__")))):
                    args = [a for a in u.args if a.keyword is None][:2]
                    return u.with_changes(args=[a.with_changes(comma=cst.MaybeSentinel.DEFAULT) for a in args])
                return u

        return updated.with_changes(bases=bases, body=updated.body.visit(_Super()))
