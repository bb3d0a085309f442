"""PT063 base-class-arm: the rule `BaseClassArm`; its `why` says what it rewrites and why."""

from __future__ import annotations

import json

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, findall, self_attr, transform
from porter.passes.attention._common import BeforeIndexRule, nlines
from porter.passes.base import Example, SourceContext
from porter.rules_data import strip_table

_ROT = (
    "class ARotaryEmbedding(nn.Module):\n    def __init__(self, dim, base=10000):\n        super().__init__()\n"
    "        self.inv_freq = 1.0 / base\n\n    def forward(self, x, seq_len=None):\n"
    "        return self.inv_freq\n\n\n"
    "class ALinearScalingRotaryEmbedding(ARotaryEmbedding):\n"
    "    def forward(self, x, seq_len=None):\n        return self.inv_freq / 2\n\n\n"
)
_ATTN = "class AAttention(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n" \
        "        self.config = config\n        self.head_dim = 32\n"


def _build(st: cst.CSTNode) -> tuple[str, str] | None:
    """`self.X = C(...)`: (X, C)."""
    if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))],
                                                          value=m.Call(func=m.Name()))])):
        a = st.body[0]  # type: ignore[attr-defined]
        return self_attr(a.targets[0].target) or "", a.value.func.value
    return None


def _negate(test: cst.BaseExpression) -> cst.BaseExpression:
    """`x is None` -> `x is not None` (and back, and == / !=); anything else -> `not (test)`."""
    if isinstance(test, cst.Comparison) and len(test.comparisons) == 1:
        op = test.comparisons[0].operator
        for a, b in ((cst.Is, cst.IsNot), (cst.IsNot, cst.Is), (cst.Equal, cst.NotEqual), (cst.NotEqual, cst.Equal)):
            if isinstance(op, a):
                return test.with_changes(comparisons=[test.comparisons[0].with_changes(operator=b())])
    return cst.UnaryOperation(operator=cst.Not(), expression=test.with_changes(
        lpar=[cst.LeftParen()], rpar=[cst.RightParen()]))


def _returns_attr(st: cst.CSTNode) -> bool:
    """`return self.X`: a read whose value the bare call discards (InternLM2's `_init_rope`)."""
    return m.matches(st, m.SimpleStatementLine(body=[m.Return(value=m.Attribute(value=m.Name("self")))]))


def _rope_scaled(kept_test: cst.BaseExpression) -> cst.BaseExpression | None:
    """The kept arm's test is `<cfg>.F is None` for F a rotary field transformers 5 keeps in
    `rope_parameters` (rules/hf_strip.yaml): there the field is never None, the unscaled rotary
    reads `rope_type` "default" (a 4.x config: `type`). The guard refuses any other type."""
    if not (isinstance(kept_test, cst.Comparison) and len(kept_test.comparisons) == 1
            and isinstance(kept_test.comparisons[0].operator, cst.Is)
            and m.matches(kept_test.comparisons[0].comparator, m.Name("None"))
            and isinstance(kept_test.left, cst.Attribute)
            and kept_test.left.attr.value in strip_table().rope_config_fields):
        return None
    f = code(kept_test.left)
    return cst.parse_expression(f'{f} is not None and {f}.get("rope_type", {f}.get("type", "default")) != "default"')


def _bare_self_call(st: cst.CSTNode) -> str | None:
    """`self.NAME()` as a statement: NAME."""
    if m.matches(st, m.SimpleStatementLine(body=[m.Expr(m.Call(func=m.Attribute(value=m.Name("self")), args=[]))])):
        return st.body[0].value.func.attr.value  # type: ignore[attr-defined]
    return None


class BaseClassArm(BeforeIndexRule):
    code = "PT063"
    name = "base-class-arm"
    why = (
        "transformers 4.3x-era attentions (and the remote code written from them: MiniCPM, InternLM2) "
        "build a sub-module in a helper their __init__ calls last (`self._init_rope()`), picking its "
        "class by a config field: the base class in one arm (the plain rotary module when "
        "`config.rope_scaling is None`), subclasses of it in the other (linear or dynamic-NTK "
        "scaling, which compute their own tables). The helper's build goes into __init__ where it "
        "was called (the planner reads a class's sub-modules there) and the port builds the base "
        "class; the subclasses are not approximated: __init__ refuses a config that takes their arm, "
        "with the reason (at load). A test that a rotary field transformers 5 keeps in `rope_parameters` "
        "is None (never None there) becomes a test of its `rope_type`. Before indexing, the source's "
        "later lines keep their numbers."
    )
    examples = [
        Example(
            _ROT + _ATTN + "        self._init_rope()\n\n    def _init_rope(self):\n"
            "        if self.config.rope_scaling is None:\n"
            "            self.rotary_emb = ARotaryEmbedding(self.head_dim)\n        else:\n"
            "            factor = self.config.rope_scaling['factor']\n"
            "            if self.config.rope_scaling['type'] == 'linear':\n"
            "                self.rotary_emb = ALinearScalingRotaryEmbedding(self.head_dim)\n"
            "            else:\n                raise ValueError('unknown')\n\n"
            "    def forward(self, x):\n        return x\n",
            _ROT + _ATTN + "        if self.config.rope_scaling is not None and self.config.rope_scaling.get(\"rope_type\", "
            "self.config.rope_scaling.get(\"type\", \"default\")) != \"default\":\n"
            "            raise ValueError(\"porter: this port builds AAttention.rotary_emb as ARotaryEmbedding only "
            "(the arm for `self.config.rope_scaling is None`); the other arm builds ALinearScalingRotaryEmbedding\")\n"
            "        self.rotary_emb = ARotaryEmbedding(self.head_dim)\n\n"
            "    def forward(self, x):\n        return x\n",
        ),
    ]

    @classmethod
    def applies(cls, ctx) -> bool:
        return True

    def rewrite(self, module: cst.Module) -> cst.Module:
        self.classes_of = {st.name.value: st for st in module.body if isinstance(st, cst.ClassDef)}
        if not isinstance(self.ctx, SourceContext):
            return super().rewrite(module)
        self.keep_lines = True
        return transform(module, self)

    def _subclass_of(self, name: str, base: str, seen: frozenset[str] = frozenset()) -> bool:
        node = self.classes_of.get(name)
        if node is None or name in seen:
            return False
        bases = [b.value.value for b in node.bases if isinstance(b.value, cst.Name)]
        return any(b == base or self._subclass_of(b, base, seen | {name}) for b in bases)

    def leave_ClassDef(self, original, updated):
        super().leave_ClassDef(original, updated)
        if self.scope or not (isinstance(self.ctx, SourceContext) or self.kept(updated.name.value)):
            return updated
        body = list(updated.body.body)
        i = next((k for k, f in enumerate(body) if isinstance(f, cst.FunctionDef) and f.name.value == "__init__"), None)
        # the helper: called as the last statement of __init__, defined right after it, followed by a method
        if i is None or i + 2 >= len(body) or not isinstance(body[i + 1], cst.FunctionDef):
            return updated
        init, helper = body[i], body[i + 1]
        name = helper.name.value
        if not init.body.body or _bare_self_call(init.body.body[-1]) != name or not self._plain(updated, helper):
            return updated
        stmts = [st for st in helper.body.body if not _returns_attr(st)]
        parts = [self._arm(updated.name.value, st) for st in stmts]
        if all(p[0] is st for p, st in zip(parts, stmts, strict=True)):
            return updated  # no arm chosen: the helper stays (and the planner sees no build)
        arm = [s for p in parts for s in p]
        call = init.body.body[-1]
        arm[0] = arm[0].with_changes(leading_lines=call.leading_lines)
        new_init = init.with_changes(body=init.body.with_changes(body=[*init.body.body[:-1], *arm]))
        nxt = body[i + 2]
        if self.keep_lines:  # the lines the helper held, less those __init__ grew by, stay as blank lines
            gone = nlines(helper) + nlines(init) - nlines(new_init)
            nxt = nxt.with_changes(leading_lines=[*([cst.EmptyLine()] * max(gone, 0)), *nxt.leading_lines])
        self.mark(f"{updated.name.value}.__init__")
        body = [*body[:i], new_init, nxt, *body[i + 3:]]
        return updated.with_changes(body=updated.body.with_changes(body=body))

    def _plain(self, cls: cst.ClassDef, fn: cst.FunctionDef) -> bool:
        """Takes only `self`, returns nothing, is named nowhere else in the file, and no class of
        the file defines a method of its name (an override a subclass would run instead)."""
        if len(fn.params.params) != 1 or fn.params.kwonly_params or fn.decorators or \
                not isinstance(fn.params.star_arg, cst.MaybeSentinel) or fn.params.star_kwarg is not None:
            return False
        body = fn.body.body
        if any(r.value is not None for st in body[:-1 if _returns_attr(body[-1]) else None]
               for r in findall(st, m.Return())):  # type: ignore[attr-defined]
            return False
        name = fn.name.value
        uses = sum(len(findall(c, m.Attribute(attr=m.Name(name)))) for c in self.classes_of.values())
        defs = sum(1 for c in self.classes_of.values() for f in c.body.body
                   if isinstance(f, cst.FunctionDef) and f.name.value == name)
        return uses == 1 and defs == 1

    def _arm(self, cls: str, st: cst.BaseStatement) -> list[cst.BaseStatement]:
        """`if T: self.X = Base(...) else: <builds of Base's subclasses>` (either way round) -> a
        guard refusing the other arm's configs, then the base build; other statements unchanged."""
        if not isinstance(st, cst.If) or not isinstance(st.orelse, cst.Else):
            return [st]
        for kept, other, kept_is_else in ((st.body.body, st.orelse.body.body, False),
                                          (st.orelse.body.body, st.body.body, True)):
            if len(kept) != 1 or (b := _build(kept[0])) is None or b[1] not in self.classes_of:
                continue
            attr, base = b
            builds = [bb for s in other for x in findall(s, m.SimpleStatementLine()) if (bb := _build(x))]
            subs = [c for a, c in builds if a == attr]
            if not subs or not all(self._subclass_of(c, base) for c in subs):
                continue
            kept_test = _negate(st.test) if kept_is_else else st.test
            guard_test = _rope_scaled(kept_test) or (st.test if kept_is_else else _negate(st.test))
            why = (f"porter: this port builds {cls}.{attr} as {base} only (the arm for `{code(kept_test)}`); "
                   f"the other arm builds {', '.join(dict.fromkeys(subs))}")
            guard = cst.If(test=guard_test, body=cst.IndentedBlock(body=[cst.SimpleStatementLine(body=[cst.Raise(
                exc=cst.Call(func=cst.Name("ValueError"), args=[cst.Arg(cst.SimpleString(json.dumps(why)))]))])]))
            return [guard, kept[0].with_changes(leading_lines=[])]
        return [st]
