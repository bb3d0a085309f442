"""PT222 output-attentions-arm: the rule `OutputAttentionsArm`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import assigned_names, findall
from porter.passes.attention._common import BeforeIndexRule, in_place_of
from porter.passes.base import Example

def _bound(node: cst.CSTNode) -> set[str]:
    return {n for a in findall(node, m.AssignTarget()) for n in assigned_names(a.target)}  # type: ignore[attr-defined]


_FLAG = m.Name("output_attentions") | m.Attribute(attr=m.Name("output_attentions"))


class OutputAttentionsArm(BeforeIndexRule):
    code = "PT222"
    name = "output-attentions-arm"
    why = (
        "Inline attentions (TrOCR) keep a reshaped copy of the probabilities only when the caller "
        "asks for them: `if output_attentions: w_reshaped = w.view(...); w = w_reshaped.view(...) "
        "else: w_reshaped = None`. The engine never returns attention weights (PT010 strips the "
        "flag), so the test is false: the `if` becomes its `else` arm, and "
        "PT150 finds the weighted sum right after the softmax."
    )
    visits_dropped_code = True
    word = "output_attentions"  # before indexing: only the top-level statements naming it are walked
    examples = [
        Example(
            "class Attn(nn.Module):\n    def forward(self, w, v, output_attentions=False):\n"
            "        w = nn.functional.softmax(w, dim=-1)\n"
            "        if output_attentions:\n            w_reshaped = w.view(b, h, t, s)\n"
            "            w = w_reshaped.view(b * h, t, s)\n"
            "        else:\n            w_reshaped = None\n"
            "        return torch.bmm(w, v), w_reshaped\n",
            "class Attn(nn.Module):\n    def forward(self, w, v, output_attentions=False):\n"
            "        w = nn.functional.softmax(w, dim=-1)\n"
            "        w_reshaped = None\n"
            "        return torch.bmm(w, v), w_reshaped\n",
        ),
    ]

    def leave_If(self, original, updated):
        if len(self.scope) < 2 or not m.matches(updated.test, _FLAG) or not isinstance(updated.orelse, cst.Else):
            return updated  # (an `if` without `else` collecting outputs: PT011 drops it with the flag)
        body = list(updated.orelse.body.body)
        if not findall(updated.orelse, m.Assign()) or _bound(updated.orelse) - _bound(updated.body):
            return updated  # the else arm binds what the flagged arm does (`w_reshaped = None`)
        body = in_place_of(updated, body, self.keep_lines)
        return cst.FlattenSentinel(body)
