"""Drop HF's argument plumbing at the top of a model forward: kwargs bookkeeping, input checks."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import children, names_in
from porter.passes.base import Example, Rule


def _only_raises(block: cst.BaseSuite) -> bool:
    return all(m.matches(s, m.SimpleStatementLine(body=[m.Raise()])) for s in block.body)  # type: ignore[attr-defined]


_UNCHANGED_PT125 = (
    'class M(nn.Module):\n'
    '    def forward(self, input_ids):\n'
    '        if input_ids.dim() == 1:\n'
    '            input_ids = input_ids.unsqueeze(0)\n'
    '        elif input_ids.dim() != 2:\n'
    "            raise ValueError('rank')\n"
    '        return self.wte(input_ids)\n'
)


class DropInputChecks(Rule):
    descend_methods = frozenset()
    code = "PT125"
    name = "drop-input-checks"
    why = (
        "HF model forwards begin with argument plumbing the engine's calling convention makes void: "
        "`kwargs.pop('output_attentions', None)` on the `**kwargs` the port no longer takes, and an "
        "`if input_ids is not None and inputs_embeds is not None: raise ... elif input_ids is not None: "
        "input_shape = input_ids.size(); input_ids = input_ids.view(-1, input_shape[-1]) ... else: raise` "
        "chain that validates the arguments and records the batch shape. The engine passes flat "
        "`[num_tokens]` ids, so the chain goes, and the names it bound (`input_shape`, `batch_size`) "
        "are HF-only: what is computed from them later is dropped by drop-hf-dataflow."
    )
    examples = [
        Example(
            "class M(nn.Module):\n    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):\n"
            "        kwargs.pop('output_attentions', None)\n"
            "        if input_ids is not None and inputs_embeds is not None:\n            raise ValueError('both')\n"
            "        elif input_ids is not None:\n            input_shape = input_ids.size()\n"
            "            input_ids = input_ids.view(-1, input_shape[-1])\n"
            "        else:\n            raise ValueError('none')\n"
            "        return self.wte(input_ids)\n",
            "class M(nn.Module):\n    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):\n"
            "        return self.wte(input_ids)\n",
        ),
        # must leave unchanged: a check whose arm also computes (reshapes the input) is kept
        Example(_UNCHANGED_PT125, _UNCHANGED_PT125),
    ]

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        if not (self.kept(cls) and len(self.scope) == 1 and updated.name.value == "forward"):
            return updated
        params = {p.name.value for p in (*updated.params.params, *updated.params.kwonly_params)}
        star_kw = updated.params.star_kwarg.name.value if isinstance(updated.params.star_kwarg, cst.Param) else None
        body, bound = [], set()
        for st in updated.body.body:
            if star_kw and m.matches(st, m.SimpleStatementLine(body=[m.Expr(m.Call(
                    func=m.Attribute(value=m.Name(star_kw), attr=m.Name("pop"))))])):
                continue
            if isinstance(st, cst.If) and _only_raises(st.body) and self._checks_params(st.test, params):
                for node in _assign_targets(st):
                    bound.add(node)
                continue
            body.append(st)
        if len(body) == len(updated.body.body):
            return updated
        self.ctx.extra_taint.setdefault(cls, set()).update(bound - params)
        return updated.with_changes(body=updated.body.with_changes(body=body))

    @staticmethod
    def _checks_params(test: cst.BaseExpression, params: set[str]) -> bool:
        """`a is not None and b is not None` over forward parameters only."""
        comparisons = [test]
        if isinstance(test, cst.BooleanOperation):
            comparisons = [test.left, test.right]
        return len(comparisons) == 2 and all(m.matches(c, m.Comparison(left=m.Name(), comparisons=[
            m.ComparisonTarget(m.IsNot(), m.Name("None"))])) for c in comparisons) \
            and names_in(test) - {"None"} <= params


def _assign_targets(node: cst.CSTNode) -> set[str]:
    out: set[str] = set()
    for a in children(node):
        if isinstance(a, cst.AssignTarget) and isinstance(a.target, cst.Name):
            out.add(a.target.value)
        out |= _assign_targets(a)
    return out
