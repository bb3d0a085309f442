"""Drop the encoder-decoder cross-attention arm of modules a decoder-only model shares with it."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import note_elif, self_attention_arm, self_attention_value
from porter.passes.base import Example, Rule


class DropCrossAttention(Rule):
    code = "PT123"
    name = "drop-cross-attention"
    why = (
        "GPT-2 style files build one attention class for two uses: causal self-attention, and the "
        "encoder-decoder cross-attention a constructor flag (`is_cross_attention=True`, only when "
        "`config.add_cross_attention`) switches on, with its own projections (`q_attn`) fed by "
        "`encoder_hidden_states`. A decoder-only engine port has no encoder: every `if` on the flag "
        "(a table in rules/hf_strip.yaml) keeps its false arm (also when the flag is a local, or one term of an `and`: BioGPT's "
        "`is_cross_attention and past_key_values is not None`; a conditional expression on it keeps "
        "its `else` value), in `__init__` and `forward` alike, so "
        "the projections and the q/k/v split the port sees are the self-attention ones. A module "
        "only such an arm calls (TrOCR's `encoder_attn`, built whenever `config.is_decoder`) is not "
        "built, and loading skips its checkpoint tensors (plan.cross_attention_modules)."
    )
    @classmethod
    def applies(cls, ctx) -> bool:
        return bool(ctx.table.cross_attention_flags & ctx.idx.identifiers)

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self._links: set[int] = set()

    examples = [
        Example(
            "class Attn(nn.Module):\n    def __init__(self, config, is_cross_attention=False):\n"
            "        super().__init__()\n        self.is_cross_attention = is_cross_attention\n"
            "        if self.is_cross_attention:\n            self.c_attn = nn.Linear(8, 16)\n"
            "            self.q_attn = nn.Linear(8, 8)\n        else:\n"
            "            self.c_attn = nn.Linear(8, 24)\n\n"
            "    def forward(self, x, encoder_hidden_states=None):\n        if self.is_cross_attention:\n"
            "            q = self.q_attn(x)\n            k, v = self.c_attn(encoder_hidden_states).split(8, dim=-1)\n"
            "        else:\n            q, k, v = self.c_attn(x).split(8, dim=-1)\n        return q, k, v\n",
            "class Attn(nn.Module):\n    def __init__(self, config, is_cross_attention=False):\n"
            "        super().__init__()\n        self.is_cross_attention = is_cross_attention\n"
            "        self.c_attn = nn.Linear(8, 24)\n\n"
            "    def forward(self, x, encoder_hidden_states=None):\n"
            "        q, k, v = self.c_attn(x).split(8, dim=-1)\n        return q, k, v\n",
        ),
        Example(  # the flag a local, in a conjunction and a conditional expression (BioGPT)
            "class Attn(nn.Module):\n    def forward(self, x, key_value_states=None, cache=None):\n"
            "        is_cross_attention = key_value_states is not None\n"
            "        states = key_value_states if is_cross_attention else x\n"
            "        if is_cross_attention and cache is not None:\n            k = cache.keys\n"
            "        else:\n            k = self.k_proj(states)\n        return k\n",
            "class Attn(nn.Module):\n    def forward(self, x, key_value_states=None, cache=None):\n"
            "        is_cross_attention = key_value_states is not None\n"
            "        states = x\n"
            "        k = self.k_proj(states)\n        return k\n",
        ),
        Example(  # a module only the cross-attention arm calls, built on another flag (TrOCR's is_decoder)
            "class Layer(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.self_attn = Attn(config)\n        if config.is_decoder:\n"
            "            self.encoder_attn = Attn(config)\n            self.encoder_attn_layer_norm = nn.LayerNorm(8)\n"
            "        self.fc1 = nn.Linear(8, 8)\n\n"
            "    def forward(self, x, encoder_hidden_states=None):\n        x = self.self_attn(x)\n"
            "        if encoder_hidden_states is not None:\n"
            "            x = self.encoder_attn_layer_norm(self.encoder_attn(x, encoder_hidden_states))\n"
            "        return self.fc1(x)\n",
            "class Layer(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.self_attn = Attn(config)\n        self.fc1 = nn.Linear(8, 8)\n\n"
            "    def forward(self, x, encoder_hidden_states=None):\n        x = self.self_attn(x)\n"
            "        return self.fc1(x)\n",
        ),
        Example(  # the flag tested again in an `elif` of the chain (transformers 4.x OPT, BART)
            "class Attn(nn.Module):\n    def forward(self, x, key_value_states=None, cache=None):\n"
            "        is_cross_attention = key_value_states is not None\n"
            "        if is_cross_attention and cache is not None:\n            k = cache[0]\n"
            "        elif is_cross_attention:\n            k = self.k_proj(key_value_states)\n"
            "        else:\n            k = self.k_proj(x)\n        return k\n",
            "class Attn(nn.Module):\n    def forward(self, x, key_value_states=None, cache=None):\n"
            "        is_cross_attention = key_value_states is not None\n"
            "        k = self.k_proj(x)\n        return k\n",
        ),
    ]

    def visit_If(self, node):
        note_elif(node, self._links)

    def leave_If(self, original, updated):
        if not self.kept(self.current_class) or id(original) in self._links:  # (an `elif`: its `if` resolves it)
            return updated
        if not updated.body.body and updated.orelse is None:
            return cst.RemoveFromParent()  # it built only cross-attention modules
        return self_attention_arm(updated, self.ctx.table.cross_attention_flags)

    def leave_SimpleStatementLine(self, original, updated):
        if self.current_function != "__init__" or not self.kept(self.current_class):
            return updated
        unused = {c.rsplit(".", 1)[1] for c in self.plan.cross_attention_modules
                  if c.rsplit(".", 1)[0] == self.current_class}
        if unused and m.matches(updated, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(
                m.Attribute(value=m.Name("self"), attr=m.Name(m.MatchIfTrue(lambda n: n in unused))))])])):
            return cst.RemoveFromParent()
        return updated

    def leave_IfExp(self, original, updated):
        if not self.kept(self.current_class):
            return updated
        return self_attention_value(updated, self.ctx.table.cross_attention_flags)
