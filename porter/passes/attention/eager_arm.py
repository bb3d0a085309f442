"""PT152 eager-arm: the rule `EagerArm`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import dotted, find_method, findall, self_attr
from porter.passes.attention._common import BeforeIndexRule, in_place_of
from porter.passes.base import Example


def _non_eager_test(test: cst.BaseExpression, flags: frozenset[str] = frozenset()) -> bool:
    """`self.config._attn_implementation == "sdpa"` (possibly `and ...`), or `self.X` where the
    class's __init__ set `self.X` to such a comparison (`flags`): false in the eager reference."""
    impl = m.Comparison(left=m.Attribute(attr=m.Name("_attn_implementation")), comparisons=[
        m.ComparisonTarget(m.Equal(), m.SimpleString(m.MatchIfTrue(lambda s: s.strip("\"'") != "eager")))])
    if m.matches(test, impl) or self_attr(test) in flags:
        return True
    return (m.matches(test, m.BooleanOperation(operator=m.And()))
            and (_non_eager_test(test.left, flags) or _non_eager_test(test.right, flags)))  # type: ignore[attr-defined]


def non_eager_flags(module: cst.Module) -> dict[str, frozenset[str]]:
    """Per class of the module: the attributes its __init__ (or a base class's in the module) sets
    to a test that a non-eager implementation is active (`self._use_sdpa = config._attn_implementation
    == "sdpa"`): the value the attribute carries is that test's, false in the eager reference."""
    classes = {st.name.value: st for st in module.body if isinstance(st, cst.ClassDef)}
    own: dict[str, set[str]] = {}
    for name, cls in classes.items():
        init = find_method(cls, "__init__")
        sets = findall(cls, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))]))
        written = [self_attr(node.targets[0].target) for node in sets]  # type: ignore[attr-defined]
        in_init = {id(node) for node in findall(init, m.Assign())} if init is not None else set()
        own[name] = {self_attr(node.targets[0].target) for node in sets  # type: ignore[attr-defined]
                     if id(node) in in_init and _non_eager_test(node.value)}  # type: ignore[attr-defined]
        own[name] = {a for a in own[name] if a is not None and written.count(a) == 1}  # set once, never changed

    def flags(name: str, seen: frozenset[str] = frozenset()) -> frozenset[str]:
        out = set(own.get(name, ()))
        for base in classes[name].bases if name in classes else ():
            base_name = dotted(base.value)
            if base_name in classes and base_name not in seen:
                out |= flags(base_name, seen | {name})
        return frozenset(out)

    return {name: flags(name) for name in classes}


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
        "implementation is active is false, and the `if` becomes its `else` arm. An attribute the class's "
        "__init__ sets once to such a test (4.x Falcon's `self._use_sdpa = config._attn_implementation == "
        "\"sdpa\"`) carries its value: a test on it is false too."
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
        # the test stored once in __init__ (4.x Falcon's `self._use_sdpa`): the flag carries its value
        Example(
            "class Attn(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self._use_sdpa = config._attn_implementation == \"sdpa\"\n\n"
            "    def forward(self, q, k, v, mask):\n"
            "        if self._use_sdpa and not self.flag:\n"
            "            out = F.scaled_dot_product_attention(q, k, v)\n"
            "        else:\n            out = self.eager(q, k, v, mask)\n        return out\n",
            "class Attn(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self._use_sdpa = config._attn_implementation == \"sdpa\"\n\n"
            "    def forward(self, q, k, v, mask):\n"
            "        out = self.eager(q, k, v, mask)\n        return out\n",
        ),
        # must leave unchanged: a test that the eager implementation is active is true in
        # the eager reference: its `if` arm is not replaced by the `else` arm
        Example(_UNCHANGED_PT152, _UNCHANGED_PT152),
        # an `elif` chain (MiniCPM's remote code): each non-eager arm is false, the eager `else` stays
        Example(
            "class Attn(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self._use_sdpa = config._attn_implementation == \"sdpa\"\n"
            "        self._use_fa2 = config._attn_implementation == \"flash_attention_2\"\n\n"
            "    def forward(self, mask):\n"
            "        if self._use_fa2:\n            mask = None\n"
            "        elif self._use_sdpa and not self.flag:\n            mask = sdpa_mask(mask)\n"
            "        else:\n            mask = eager_mask(mask)\n        return mask\n",
            "class Attn(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self._use_sdpa = config._attn_implementation == \"sdpa\"\n"
            "        self._use_fa2 = config._attn_implementation == \"flash_attention_2\"\n\n"
            "    def forward(self, mask):\n"
            "        mask = eager_mask(mask)\n        return mask\n",
        ),
    ]

    flags: dict[str, frozenset[str]] = {}

    def rewrite(self, module: cst.Module) -> cst.Module:
        self.flags = non_eager_flags(module)
        self.elifs = set()
        return super().rewrite(module)

    elifs: set[int] = set()

    def visit_If(self, node):
        if isinstance(node.orelse, cst.If):
            self.elifs.add(id(node.orelse))  # an `elif`: its parent `if` rewrites it (no statement list here)
        return True

    def _drop_false_elifs(self, node: cst.If, flags: frozenset[str]) -> cst.If:
        """`elif <non-eager test>:` arms are false in the eager reference: the chain goes on with
        what follows them."""
        orelse = node.orelse
        if isinstance(orelse, cst.If) and _non_eager_test(orelse.test, flags):
            return self._drop_false_elifs(node.with_changes(orelse=orelse.orelse), flags)
        if isinstance(orelse, cst.If):
            inner = self._drop_false_elifs(orelse, flags)
            return node if inner is orelse else node.with_changes(orelse=inner)
        return node

    def leave_If(self, original, updated):
        flags = self.flags.get(self.scope[0], frozenset()) if self.scope else frozenset()
        if len(self.scope) < 2 or id(original) in self.elifs:
            return updated
        updated = self._drop_false_elifs(updated, flags)
        if not _non_eager_test(updated.test, flags) or updated.orelse is None or isinstance(updated.orelse, cst.If):
            return updated
        body = list(updated.orelse.body.body)
        body = in_place_of(updated, body, self.keep_lines)
        return cst.FlattenSentinel(body)
