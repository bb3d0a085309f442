"""PT202 device-fast-path: the rule `DeviceFastPath`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.passes.attention._common import BeforeIndexRule, in_place_of
from porter.passes.base import Example, SourceContext

_IS_CUDA = m.Attribute(attr=m.Name("is_cuda"))


def _cuda_test(test: cst.BaseExpression) -> bool:
    """`x.is_cuda`, or a conjunction with it (`x.is_cuda and x.dtype == w.dtype and ...`)."""
    if m.matches(test, _IS_CUDA):
        return True
    return m.matches(test, m.BooleanOperation(operator=m.And())) and (
        _cuda_test(test.left) or _cuda_test(test.right))  # type: ignore[attr-defined]


_UNCHANGED = (
    "class Router(nn.Module):\n    def forward(self, x):\n"
    "        if not x.is_cuda:\n            logits = F.linear(x.float(), self.weight.float())\n"
    "        else:\n            logits = torch.mm(x, self.weight.t(), out_dtype=torch.float32)\n"
    "        return logits\n"
)


class DeviceFastPath(BeforeIndexRule):
    code = "PT202"
    name = "device-fast-path"
    why = (
        "Some routers compute their logits twice, in arms of `if x.is_cuda and ...:` (Kolibri1: a "
        "CUDA-only `torch.mm(..., out_dtype=torch.float32)` of bf16 weights, else `F.linear` in "
        "float32). Both arms compute the same logits, the second at HF's reference precision. The "
        "port follows the reference: a test that requires CUDA (`is_cuda`, possibly in an `and`) is "
        "false, and the `if` becomes its `else` arm, which the router analysis then reads."
    )
    visits_dropped_code = True
    word = "is_cuda"  # before indexing: only the top-level statements naming it are walked
    examples = [
        Example(
            "class Router(nn.Module):\n    def forward(self, x):\n"
            "        if x.is_cuda and x.dtype == self.weight.dtype:\n"
            "            logits = torch.mm(x, self.weight.t(), out_dtype=torch.float32)\n"
            "        else:\n            logits = F.linear(x.float(), self.weight.float())\n"
            "        return logits\n",
            "class Router(nn.Module):\n    def forward(self, x):\n"
            "        logits = F.linear(x.float(), self.weight.float())\n        return logits\n",
        ),
        # must leave unchanged: the CUDA arm is the `else` one (a negated test is not read)
        Example(_UNCHANGED, _UNCHANGED),
    ]

    @classmethod
    def applies(cls, ctx) -> bool:
        if isinstance(ctx, SourceContext):
            return "is_cuda" in ctx.text
        return "is_cuda" in ctx.idx.identifiers

    def leave_If(self, original, updated):
        if len(self.scope) < 2 or not _cuda_test(updated.test) or updated.orelse is None \
                or isinstance(updated.orelse, cst.If):
            return updated
        body = list(updated.orelse.body.body)
        body = in_place_of(updated, body, self.keep_lines)
        self.mark()
        return cst.FlattenSentinel(body)
