"""PT170 alibi-arm: the rule `AlibiArm`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, findall
from porter.passes.attention._common import BeforeIndexRule, in_place_of
from porter.passes.base import Example

_ATTN = m.Call(func=m.Name("attention_interface"))


def _is_none_test(test: cst.BaseExpression, params: set[str]) -> tuple[str, bool] | None:
    """`P is None` -> (P, True), `P is not None` -> (P, False), for a parameter P."""
    for op, none in ((m.Is(), True), (m.IsNot(), False)):
        if m.matches(test, m.Comparison(left=m.Name(m.MatchIfTrue(lambda n: n in params)),
                                        comparisons=[m.ComparisonTarget(op, m.Name("None"))])):
            return test.left.value, none  # type: ignore[attr-defined]
    return None


class _Normalize(cst.CSTTransformer):
    """`self.x` -> the expression `__init__` binds it to; `1.0` -> `1`: scales compared by value."""

    def __init__(self, attrs: dict[str, cst.BaseExpression]) -> None:
        super().__init__()
        self.attrs = attrs

    def leave_Attribute(self, original, updated):
        if m.matches(updated, m.Attribute(value=m.Name("self"))) and updated.attr.value in self.attrs:
            return self.attrs[updated.attr.value].visit(self)
        return updated

    def leave_Float(self, original, updated):
        value = float(updated.value)
        return cst.Integer(str(int(value))) if value.is_integer() else updated


def _kwargs(call: cst.Call) -> dict[str, cst.BaseExpression]:
    return {a.keyword.value: a.value for a in call.args if a.keyword is not None}


class AlibiArm(BeforeIndexRule):
    code = "PT170"
    name = "alibi-arm"
    why = (
        "Falcon computes attention in two arms of `if alibi is None:` (rotary checkpoints pass no "
        "bias, ALiBi ones do), which PT150 has made two attention-function calls, the second with "
        "`alibi=alibi`. The arms differ only in that call (and the name of the weights): when their "
        "scales are the same value (`self.inv_norm_factor` is `1.0 / math.sqrt(self.head_dim)`), one "
        "call with `alibi=alibi` is the same computation for both (no bias when none is passed), and "
        "the engine's Attention adds the bias from slopes exactly when the config builds it (PT021). "
        "Arms that differ in anything else are left alone."
    )
    visits_dropped_code = True
    word = "alibi"  # before indexing: only the top-level statements naming it are walked
    examples = [
        Example(
            "class Attn(nn.Module):\n    def __init__(self, config):\n"
            "        self.inv_norm_factor = 1.0 / math.sqrt(self.head_dim)\n\n"
            "    def forward(self, x, alibi, mask):\n"
            "        if alibi is None:\n"
            "            out, w = attention_interface(self, q, k, v, mask, scaling=1 / math.sqrt(self.head_dim))\n"
            "            out = self.dense(out)\n            return out, w\n"
            "        else:\n"
            "            out, p = attention_interface(self, q, k, v, mask, scaling=self.inv_norm_factor, "
            "alibi=alibi, alibi_scale=self.inv_norm_factor)\n"
            "            out = self.dense(out)\n            return out, p\n",
            "class Attn(nn.Module):\n    def __init__(self, config):\n"
            "        self.inv_norm_factor = 1.0 / math.sqrt(self.head_dim)\n\n"
            "    def forward(self, x, alibi, mask):\n"
            "        out, p = attention_interface(self, q, k, v, mask, scaling=self.inv_norm_factor, "
            "alibi=alibi, alibi_scale=self.inv_norm_factor)\n"
            "        out = self.dense(out)\n        return out, p\n",
        ),
    ]

    def visit_ClassDef(self, node):
        self._attrs: dict[str, cst.BaseExpression] = {}
        for st in node.body.body:
            if isinstance(st, cst.FunctionDef) and st.name.value == "__init__":
                for a in findall(st, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))])):
                    self._attrs.setdefault(a.targets[0].target.attr.value, a.value)  # type: ignore[attr-defined]
        return super().visit_ClassDef(node)

    def visit_FunctionDef(self, node):
        if len(self.scope) == 1:
            p = node.params
            self._params = {x.name.value for x in (*p.posonly_params, *p.params, *p.kwonly_params)}
        return super().visit_FunctionDef(node)

    def leave_If(self, original, updated):
        if len(self.scope) < 2 or not isinstance(updated.orelse, cst.Else):
            return updated
        found = _is_none_test(updated.test, getattr(self, "_params", set()))
        if found is None:
            return updated
        bias, none_first = found
        plain_arm, bias_arm = (updated.body, updated.orelse.body) if none_first else (updated.orelse.body, updated.body)
        plain_calls, bias_calls = findall(plain_arm, _ATTN), findall(bias_arm, _ATTN)
        if len(plain_calls) != 1 or len(bias_calls) != 1:
            return updated
        plain, biased = _kwargs(plain_calls[0]), _kwargs(bias_calls[0])  # type: ignore[arg-type]
        if "alibi" in plain or not m.matches(biased.get("alibi"), m.Name(bias)):
            return updated
        norm = _Normalize(getattr(self, "_attrs", {}))
        scales = [code(k["scaling"].visit(norm)) if "scaling" in k else None for k in (plain, biased)]
        if scales[0] != scales[1] or any(k not in ("scaling", "alibi", "alibi_scale") for k in biased.keys() - plain.keys()):
            return updated
        if not self._same_but_call(list(plain_arm.body), list(bias_arm.body)):  # type: ignore[attr-defined]
            return updated
        body = list(bias_arm.body)  # type: ignore[attr-defined]
        body = in_place_of(updated, body, self.keep_lines)
        body = [body[0], *(st.with_changes(leading_lines=()) for st in body[1:])] if not self.keep_lines else body
        return cst.FlattenSentinel(body)

    @staticmethod
    def _same_but_call(plain: list[cst.BaseStatement], biased: list[cst.BaseStatement]) -> bool:
        """Statement by statement equal, but for the attention call and the name its weights are bound to."""
        if len(plain) != len(biased):
            return False
        rename: dict[str, str] = {}
        for a, b in zip(plain, biased):
            ca, cb = findall(a, _ATTN), findall(b, _ATTN)
            if ca or cb:
                if not (ca and cb and m.matches(a, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Tuple())])]))
                        and m.matches(b, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Tuple())])]))):
                    return False
                ta = [code(e.value) for e in a.body[0].targets[0].target.elements]  # type: ignore[attr-defined]
                tb = [code(e.value) for e in b.body[0].targets[0].target.elements]  # type: ignore[attr-defined]
                if len(ta) != len(tb) or ta[0] != tb[0]:
                    return False
                rename.update(zip(ta[1:], tb[1:]))
                continue

            class _Rename(cst.CSTTransformer):
                def leave_Name(self, o, u):
                    return u.with_changes(value=rename.get(u.value, u.value))

            if code(a.visit(_Rename()).with_changes(leading_lines=())).strip() != \
                    code(b.with_changes(leading_lines=())).strip():
                return False
        return True
