"""PT171 alibi-by-config: the rule `AlibiTestByConfig`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import findall
from porter.passes.base import Example, Rule


class AlibiTestByConfig(Rule):
    code = "PT171"
    name = "alibi-by-config"
    descend_methods = frozenset({"forward"})
    why = (
        "After PT170 the attention still tests the bias it is passed to choose rotary (`if alibi is "
        "None: q, k = rotary(...)`). The bias is gone from the port (the engine's Attention adds it "
        "from slopes), but it was only ever built under a config test (`if self.use_alibi:` in the "
        "model, `self.use_alibi = config.alibi`): the attention reads that config attribute itself "
        "(`self.use_alibi = config.alibi` in `__init__`) and tests it instead, so the choice is made by "
        "the config, never by the input. Where the model also folds the bias into the mask it passes "
        "with it (transformers' Falcon: its eager attention then adds the bias twice, SDPA once), "
        "__init__ refuses the config that builds the bias: HF gives no single reference for it."
    )
    examples = [
        Example(
            "class Attn(nn.Module):\n    def __init__(self, config):\n        self.head_dim = 32\n\n"
            "    def forward(self, x, alibi):\n        if alibi is None:\n            x = rotate(x)\n        return x\n",
            "class Attn(nn.Module):\n    def __init__(self, config):\n        self.head_dim = 32\n"
            "        self.use_alibi = config.alibi\n\n"
            "    def forward(self, x, alibi):\n        if not self.use_alibi:\n            x = rotate(x)\n        return x\n",
            seed={"alibi_tests": {"Attn": ("alibi", "config.alibi")}},
        ),
        # the model also folds the bias into the mask it passes with it: the config is refused
        Example(
            "class Attn(nn.Module):\n    def __init__(self, config):\n        self.head_dim = 32\n\n"
            "    def forward(self, x, alibi, attention_mask):\n        if alibi is None:\n            x = rotate(x)\n"
            "        return x\n\n\nclass Model(nn.Module):\n    def forward(self, x, alibi):\n"
            "        mask = alibi / 8\n        return self.attn(x, alibi=alibi, attention_mask=mask)\n",
            "class Attn(nn.Module):\n    def __init__(self, config):\n        self.head_dim = 32\n"
            "        self.use_alibi = config.alibi\n        if config.alibi:\n"
            "            raise ValueError(\"porter: transformers' Attn adds the ALiBi bias twice in eager attention "
            "(to its scores and in the mask the model folds it into) and once in SDPA: no single reference for "
            "config.alibi=True\")\n\n"
            "    def forward(self, x, alibi, attention_mask):\n        if not self.use_alibi:\n            x = rotate(x)\n"
            "        return x\n\n\nclass Model(nn.Module):\n    def forward(self, x, alibi):\n"
            "        mask = alibi / 8\n        return self.attn(x, alibi=alibi, attention_mask=mask)\n",
            seed={"alibi_tests": {"Attn": ("alibi", "config.alibi")}},
        ),
    ]

    def _bias(self) -> tuple[str, str] | None:
        """(bias parameter, config test) of the current attention class."""
        return self.plan.alibi_tests.get(self.current_class or "")

    @staticmethod
    def _flag(when: str) -> str:
        return "use_" + when.rsplit(".", 1)[-1]

    def _tests(self, fn: cst.CSTNode, bias: str) -> list[cst.CSTNode]:
        return findall(fn, m.Comparison(left=m.Name(bias), comparisons=[
            m.ComparisonTarget(m.Is() | m.IsNot(), m.Name("None"))]))

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        found = self._bias()
        if found is None or len(self.scope) != 1 or updated.name.value != "__init__":
            return updated
        info = self.ctx.idx.classes.get(cls or "")
        fwd = info.method("forward") if info else None
        if fwd is None or not self._tests(fwd, found[0]):
            return updated
        st = [cst.parse_statement(f"self.{self._flag(found[1])} = {found[1]}\n")]
        if self._bias_in_mask(found[0]):
            st.append(cst.parse_statement(
                f"if {found[1]}:\n    raise ValueError(\"porter: transformers' {cls} adds the ALiBi bias twice in "
                f"eager attention (to its scores and in the mask the model folds it into) and once in SDPA: "
                f"no single reference for {found[1]}=True\")\n"))
        self.mark(f"{cls}.__init__")
        return updated.with_changes(body=updated.body.with_changes(body=[*updated.body.body, *st]))

    def _bias_in_mask(self, bias: str) -> bool:
        """A forward that passes the bias on (`alibi=alibi`) and also a mask computed from it
        (`attention_mask=causal_mask`, `causal_mask = masked_fill(alibi / ..., ...)`): an attention
        that adds the bias to its scores and then the mask adds it twice (Falcon's eager path)."""
        for fn in findall(self.ctx.idx.module, m.FunctionDef(name=m.Name("forward"))):
            from_bias = {a.targets[0].target.value  # type: ignore[attr-defined]
                         for a in findall(fn, m.Assign(targets=[m.AssignTarget(m.Name())]))
                         if findall(a.value, m.Name(bias))}  # type: ignore[attr-defined]
            for call in findall(fn, m.Call()):
                kw = {a.keyword.value: a.value for a in call.args if a.keyword is not None}  # type: ignore[attr-defined]
                mask = kw.get("attention_mask")
                if m.matches(kw.get(bias), m.Name(bias)) and isinstance(mask, cst.Name) and mask.value in from_bias:
                    return True
        return False

    def leave_Comparison(self, original, updated):
        found = self._bias()
        if found is None or self.current_function != "forward" or not self._tests(updated, found[0]) \
                or len(updated.comparisons) != 1:
            return updated
        flag = cst.parse_expression(f"self.{self._flag(found[1])}")
        if isinstance(updated.comparisons[0].operator, cst.Is):
            return cst.UnaryOperation(operator=cst.Not(), expression=flag)
        return flag
