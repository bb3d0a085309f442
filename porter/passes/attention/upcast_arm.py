"""PT220 upcast-arm: the rule `UpcastArm`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, findall
from porter.passes.attention._common import BeforeIndexRule, in_place_of
from porter.passes.base import Example

_HALF = m.Attribute(value=m.Name("torch"), attr=m.Name("float16") | m.Name("bfloat16") | m.Name("half"))
_SOFTMAX = m.Call(func=m.Attribute(attr=m.Name("softmax")) | m.Name("softmax"))


def _assign(st: cst.CSTNode) -> tuple[str, cst.Call] | None:
    """`w = softmax(...)...` -> (w, the softmax call)."""
    if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())])])):
        a = st.body[0]  # type: ignore[attr-defined]
        calls = findall(a.value, _SOFTMAX)
        if len(calls) == 1:
            return a.targets[0].target.value, calls[0]  # type: ignore[return-value]
    return None


def _same_softmax(a: cst.Call, b: cst.Call) -> bool:
    """The same softmax of the same scores along the same dim, up to a `dtype=` upcast."""
    def key(c: cst.Call) -> tuple[str, str]:
        kept = [x for x in c.args if not (x.keyword is not None and x.keyword.value == "dtype")]
        return code(c.func), ", ".join(code(x.value) if x.keyword is None else f"{x.keyword.value}={code(x.value)}"
                                       for x in kept)
    return key(a) == key(b)


_UNCHANGED = (
    "class Attn(nn.Module):\n    def forward(self, w):\n"
    "        if w.dtype == torch.float16:\n            w = nn.functional.softmax(w, dim=-1)\n"
    "        else:\n            w = nn.functional.softmax(w * 2, dim=-1)\n        return w\n"
)


class UpcastArm(BeforeIndexRule):
    code = "PT220"
    name = "upcast-arm"
    why = (
        "BART-era attentions (XGLM, TrOCR) normalise the scores in two arms of `if w.dtype == "
        "torch.float16:` — the half-precision arm takes the softmax in float32 (`dtype=torch.float32`) "
        "and casts back, the other takes it as is. Both compute the same probabilities (the first only "
        "guards half precision against overflow, which the engine's attention kernel does itself), so "
        "the `if` becomes its `else` arm, and PT150 sees one softmax. Arms that differ in anything but "
        "that upcast are left alone."
    )
    visits_dropped_code = True
    word = "softmax"  # before indexing: only the top-level statements naming it are walked
    examples = [
        Example(
            "class Attn(nn.Module):\n    def forward(self, w):\n"
            "        if w.dtype == torch.float16:\n"
            "            w = nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(torch.float16)\n"
            "        else:\n            w = nn.functional.softmax(w, dim=-1)\n        return w\n",
            "class Attn(nn.Module):\n    def forward(self, w):\n"
            "        w = nn.functional.softmax(w, dim=-1)\n        return w\n",
        ),
        # must leave unchanged: the arms take the softmax of different scores
        Example(_UNCHANGED, _UNCHANGED),
    ]

    def leave_If(self, original, updated):
        if len(self.scope) < 2 or not isinstance(updated.orelse, cst.Else):
            return updated
        if not m.matches(updated.test, m.Comparison(left=m.Attribute(attr=m.Name("dtype")),
                                                    comparisons=[m.ComparisonTarget(m.Equal(), _HALF)])):
            return updated
        half, plain = list(updated.body.body), list(updated.orelse.body.body)
        if len(half) != 1 or len(plain) != 1:
            return updated
        a, b = _assign(half[0]), _assign(plain[0])
        if a is None or b is None or a[0] != b[0] or not _same_softmax(a[1], b[1]):
            return updated
        return in_place_of(updated, plain, self.keep_lines)[0]
