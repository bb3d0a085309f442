"""PT291 kv-sharing: the rule `KvSharing`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst

from porter.analysis.kv_sharing import kv_sharing
from porter.passes.base import Example, Rule

_SHARED = (
    "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config, layer_idx):\n"
    "        super().__init__()\n        self.head_dim = config.head_dim\n"
    "        self.shared = layer_idx >= 2\n        self.store = layer_idx == 1\n"
    "        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n"
    "        if not self.shared:\n"
    "            self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
    "            self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n\n"
    "    def forward(self, x, shared_kv, past_key_values=None):\n"
    "        q = self.q_proj(x)\n"
)


class KvSharing(Rule):
    descend_methods = frozenset()
    code = "PT291"
    name = "kv-sharing"
    why = (
        "Gemma-3n / Gemma-4 layers past `num_kv_shared_layers` project no keys or values: they attend with "
        "the k/v an earlier layer stored in a dict the model hands every layer (`shared_kv_states`). The "
        "engine's `Attention(kv_sharing_target_layer_name=...)` reads the target layer's KV cache instead "
        "and takes no k/v (`self.attn(q, None, None)`, as vLLM's own gemma3n/gemma4 do). Found by dataflow "
        "(porter/analysis/kv_sharing.py): the arm of an `if` that unpacks k and v from a subscript of a "
        "forward parameter reads them; a statement storing the tuple of the two into that parameter, under "
        "an `if` of its own, writes them. In forward the reading arm binds k and v to None and the "
        "writing `if` goes; the parameter is HF-only from here on (PT010 strips it down the layers). "
        "PT293 builds the layer's attention on the target's cache."
    )
    examples = [
        Example(
            _SHARED + "        if self.shared:\n            k, v = shared_kv[self.layer_type]\n"
            "            k = k.to(q.device)\n        else:\n            k = self.k_proj(x)\n            v = self.v_proj(x)\n"
            "        if self.store:\n            shared_kv[self.layer_type] = k, v\n"
            "        out, _ = attention_interface(self, q, k, v, None)\n        return out\n",
            _SHARED + "        if self.shared:\n            k, v = None, None\n"
            "        else:\n            k = self.k_proj(x)\n            v = self.v_proj(x)\n"
            "        out, _ = attention_interface(self, q, k, v, None)\n        return out\n",
        ),
    ]

    @classmethod
    def classes(cls, ctx) -> set[str] | None:
        return {a.cls for a in ctx.plan.attentions if a.kv_shared_when}

    @classmethod
    def applies(cls, ctx) -> bool:
        return bool(cls.classes(ctx))

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        if len(self.scope) != 1 or updated.name.value != "forward" or cls not in (self._only_classes or ()):
            return updated
        share = kv_sharing(updated)
        if share is None or share.writer is None:
            raise self.ctx.idx.error("cannot port KV sharing: the arm reading k/v or the statement storing them "
                                     "is not where the plan found it", construct=f"{cls}.forward", rule=self.name)
        none = cst.parse_statement(f"{share.names[0]}, {share.names[1]} = None, None\n")
        reader, writer = share.reader, share.writer

        class _Edit(cst.CSTTransformer):
            def leave_If(self, orig, upd):
                if orig is reader:
                    if share.shared_when.startswith("not ("):
                        return upd.with_changes(orelse=upd.orelse.with_changes(body=upd.orelse.body.with_changes(body=[none])))
                    return upd.with_changes(body=upd.body.with_changes(body=[none]))
                return upd

            def leave_IndentedBlock(self, orig, upd):
                return upd.with_changes(body=[s for s in upd.body if s is not writer and not _same(s, writer)])

        out = updated.visit(_Edit())
        out = out.with_changes(body=out.body.with_changes(body=[
            s for s in out.body.body if not _same(s, writer)]))
        self.mark(f"{cls}.forward")
        return out


def _same(a: cst.CSTNode, b: cst.CSTNode) -> bool:
    return a is b or (isinstance(a, cst.If) and a.deep_equals(b))
