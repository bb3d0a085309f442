"""PT152 eager-arm: the rule `EagerArm`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.passes.attention._common import BeforeIndexRule, in_place_of
from porter.passes.base import Example


def _non_eager_test(test: cst.BaseExpression) -> bool:
    """`self.config._attn_implementation == "sdpa"` (possibly `and ...`): false in the eager reference."""
    impl = m.Comparison(left=m.Attribute(attr=m.Name("_attn_implementation")), comparisons=[
        m.ComparisonTarget(m.Equal(), m.SimpleString(m.MatchIfTrue(lambda s: s.strip("\"'") != "eager")))])
    return m.matches(test, impl) or (m.matches(test, m.BooleanOperation(operator=m.And()))
                                     and (_non_eager_test(test.left) or _non_eager_test(test.right)))  # type: ignore[attr-defined]


_UNCHANGED_PT152 = (
    'class Attn(nn.Module):\n'
    '    def forward(self, q, k, v, mask):\n'
    '        if self.config._attn_implementation == "eager":\n'
    '            out = self.eager(q, k, v, mask)\n'
    '        else:\n'
    '            out = F.scaled_dot_product_attention(q, k, v)\n'
    '        return out\n'
)


class EagerArm(BeforeIndexRule):
    code = "PT152"
    name = "eager-arm"
    why = (
        "Some attentions branch on the attention implementation inside forward (`if "
        "self.config._attn_implementation == \"sdpa\" and not output_attentions: ... "
        "scaled_dot_product_attention(...) else: <inline eager attention>`, Falcon). The port follows "
        "HF's eager reference, as it does for attention class tables (PT122): a test that a non-eager "
        "implementation is active is false, and the `if` becomes its `else` arm."
    )
    visits_dropped_code = True
    word = "_attn_implementation"  # before indexing: only the top-level statements naming it are walked
    examples = [
        Example(
            "class Attn(nn.Module):\n    def forward(self, q, k, v, mask):\n"
            "        if self.config._attn_implementation == \"sdpa\" and not self.flag:\n"
            "            out = F.scaled_dot_product_attention(q, k, v)\n"
            "        else:\n            out = self.eager(q, k, v, mask)\n        return out\n",
            "class Attn(nn.Module):\n    def forward(self, q, k, v, mask):\n"
            "        out = self.eager(q, k, v, mask)\n        return out\n",
        ),
        # must leave unchanged: a test that the eager implementation is active is true in
        # the eager reference: its `if` arm is not replaced by the `else` arm
        Example(_UNCHANGED_PT152, _UNCHANGED_PT152),
    ]

    def leave_If(self, original, updated):
        if len(self.scope) < 2 or not _non_eager_test(updated.test) or updated.orelse is None \
                or isinstance(updated.orelse, cst.If):
            return updated
        body = list(updated.orelse.body.body)
        body = in_place_of(updated, body, self.keep_lines)
        return cst.FlattenSentinel(body)
