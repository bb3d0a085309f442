"""PT157 inline-absent-input-arm: the rule `InlineAbsentInputArm`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import assigned_names, findall
from porter.passes.attention._absent_arms import NONE_TEST
from porter.passes.attention._common import BeforeIndexRule
from porter.passes.attention._score_arms import computes_softmax, keep_arms
from porter.passes.base import Example
from porter.rules_data import strip_table

class InlineAbsentInputArm(BeforeIndexRule):
    code = "PT157"
    name = "inline-absent-input-arm"
    why = (
        "Attentions of transformers 4.x multiply the probabilities by a per-head mask between the "
        "softmax and the weighted sum: `if head_mask is not None: w = w * head_mask`. The head mask "
        "is an HF-only input a generation never gives (rules/hf_strip.yaml absent_params; PT011 "
        "strips the parameter), so the test is false. In a method that takes the softmax itself "
        "the `if` becomes the arm that runs without the input (its `else`, or nothing) before PT150 "
        "reads the region, which would otherwise end at it. Only for a parameter of the method that it never rebinds."
    )
    visits_dropped_code = True
    word = "softmax"  # before indexing: only the top-level statements naming it are walked
    examples = [
        Example(
            "class Attn(nn.Module):\n    def _attn(self, q, k, v, head_mask=None):\n"
            "        w = nn.functional.softmax(torch.matmul(q, k.transpose(-1, -2)), dim=-1)\n"
            "        if head_mask is not None:\n            w = w * head_mask\n"
            "        return torch.matmul(w, v), w\n",
            "class Attn(nn.Module):\n    def _attn(self, q, k, v, head_mask=None):\n"
            "        w = nn.functional.softmax(torch.matmul(q, k.transpose(-1, -2)), dim=-1)\n"
            "        return torch.matmul(w, v), w\n",
        ),
        # unchanged: a mask the method does not receive as a parameter (a local of its own)
        Example(
            "class Attn(nn.Module):\n    def _attn(self, q, k, v):\n"
            "        head_mask = self.head_mask\n"
            "        w = nn.functional.softmax(torch.matmul(q, k.transpose(-1, -2)), dim=-1)\n"
            "        if head_mask is not None:\n            w = w * head_mask\n"
            "        return torch.matmul(w, v), w\n",
            "class Attn(nn.Module):\n    def _attn(self, q, k, v):\n"
            "        head_mask = self.head_mask\n"
            "        w = nn.functional.softmax(torch.matmul(q, k.transpose(-1, -2)), dim=-1)\n"
            "        if head_mask is not None:\n            w = w * head_mask\n"
            "        return torch.matmul(w, v), w\n",
        ),
    ]

    def visit_FunctionDef(self, node):
        if len(self.scope) == 1:
            p = node.params
            params = {x.name.value for x in (*p.posonly_params, *p.params, *p.kwonly_params)}
            rebound = {n for a in findall(node.body, m.AssignTarget()) for n in assigned_names(a.target)}  # type: ignore[attr-defined]
            self._absent = set(strip_table().absent_params) & params - rebound if computes_softmax(node) else set()
        return super().visit_FunctionDef(node)

    def leave_IndentedBlock(self, original, updated):
        if len(self.scope) < 2 or not getattr(self, "_absent", None):
            return updated
        new = keep_arms(updated, self._arm, self.keep_lines)
        return updated if new is None else new

    def _arm(self, st: cst.BaseStatement) -> list[cst.BaseStatement] | None:
        """The arm of `if X is (not) None:` that runs when X is not given."""
        if not isinstance(st, cst.If) or isinstance(st.orelse, cst.If) or not m.matches(st.test, NONE_TEST):
            return None
        if st.test.left.value not in self._absent:  # type: ignore[attr-defined]
            return None
        if isinstance(st.test.comparisons[0].operator, cst.Is):  # type: ignore[attr-defined]
            return list(st.body.body)
        return list(st.orelse.body.body) if st.orelse is not None else []
