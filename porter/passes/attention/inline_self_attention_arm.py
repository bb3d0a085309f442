"""PT156 inline-self-attention-arm: the rule `InlineSelfAttentionArm`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst

from porter.analysis.cstutil import cross_attention_arm
from porter.passes.attention._common import BeforeIndexRule
from porter.passes.attention._score_arms import computes_softmax, keep_arms, score_steps
from porter.passes.base import Example
from porter.rules_data import strip_table


class InlineSelfAttentionArm(BeforeIndexRule):
    code = "PT156"
    name = "inline-self-attention-arm"
    why = (
        "GPT-2 era attentions (transformers 4.x) mask the scores with their causal buffer only for "
        "self-attention: `if not self.is_cross_attention: causal_mask = self.bias[...]; w = "
        "torch.where(causal_mask, w, min)`. A decoder-only port has no cross-attention (PT123 keeps "
        "the self-attention arm of every such `if`, a table in rules/hf_strip.yaml), but PT150 reads "
        "the scores before that: so in a method that takes the softmax itself, an `if` on a "
        "cross-attention flag between the scores' matmul and the softmax becomes its self-attention arm here (the body under `not flag`, the "
        "`else` or nothing under `flag`), and PT150 sees the causal mask among the score steps."
    )
    visits_dropped_code = True
    word = "softmax"  # before indexing: only the top-level statements naming it are walked
    examples = [
        Example(
            "class Attn(nn.Module):\n    def _attn(self, q, k, v):\n"
            "        w = torch.matmul(q, k.transpose(-1, -2))\n"
            "        if not self.is_cross_attention:\n"
            "            n, m = q.size(-2), k.size(-2)\n"
            "            causal = self.bias[:, :, m - n : m, :m]\n"
            "            w = torch.where(causal, w, torch.finfo(w.dtype).min)\n"
            "        if self.is_cross_attention:\n            w = w + self.extra\n"
            "        w = nn.functional.softmax(w, dim=-1)\n"
            "        return torch.matmul(w, v), w\n",
            "class Attn(nn.Module):\n    def _attn(self, q, k, v):\n"
            "        w = torch.matmul(q, k.transpose(-1, -2))\n"
            "        n, m = q.size(-2), k.size(-2)\n"
            "        causal = self.bias[:, :, m - n : m, :m]\n"
            "        w = torch.where(causal, w, torch.finfo(w.dtype).min)\n"
            "        w = nn.functional.softmax(w, dim=-1)\n"
            "        return torch.matmul(w, v), w\n",
        ),
        # unchanged: a method that takes no softmax (PT123 settles its `if` after indexing)
        Example(
            "class Attn(nn.Module):\n    def _attn(self, q, k):\n"
            "        return nn.functional.softmax(torch.matmul(q, k.transpose(-1, -2)), dim=-1)\n\n"
            "    def forward(self, x):\n"
            "        if self.is_cross_attention:\n            q = self.q_attn(x)\n"
            "        else:\n            q = self.c_attn(x)\n        return self._attn(q, q)\n",
            "class Attn(nn.Module):\n    def _attn(self, q, k):\n"
            "        return nn.functional.softmax(torch.matmul(q, k.transpose(-1, -2)), dim=-1)\n\n"
            "    def forward(self, x):\n"
            "        if self.is_cross_attention:\n            q = self.q_attn(x)\n"
            "        else:\n            q = self.c_attn(x)\n        return self._attn(q, q)\n",
        ),
    ]

    def visit_FunctionDef(self, node):
        if len(self.scope) == 1:
            self._soft = computes_softmax(node)
        return super().visit_FunctionDef(node)

    def leave_IndentedBlock(self, original, updated):
        if len(self.scope) < 2 or not getattr(self, "_soft", False):
            return updated
        flags = strip_table().cross_attention_flags
        between = score_steps(list(updated.body))  # the `if`s between the scores' matmul and the softmax only
        new = keep_arms(updated, lambda st: self._arm(st, flags) if id(st) in between else None, self.keep_lines)
        return updated if new is None else new

    @staticmethod
    def _arm(st, flags):
        if not isinstance(st, cst.If):
            return None
        cross = cross_attention_arm(st.test, flags)
        if cross is None:
            return None
        if cross is False:  # `if not self.is_cross_attention:`: self-attention runs the body
            return list(st.body.body)
        if st.orelse is None:
            return []
        if isinstance(st.orelse, cst.If):
            return [st.orelse]
        return list(st.orelse.body.body)
