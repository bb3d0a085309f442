"""PT221 flat-position-lookup: the rule `FlatPositionLookup`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import assigned_names, code, findall, param_names
from porter.passes.base import Example, Rule

_SIZE = m.Call(func=m.Attribute(value=m.Name("positions"), attr=m.Name("size")), args=[]) | m.Attribute(
    value=m.Name("positions"), attr=m.Name("shape"))


class FlatPositionLookup(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT221"
    name = "flat-position-lookup"
    why = (
        "A position-embedding module looks its table up by HF's (batch, seq) positions and restores "
        "that shape: `bsz, seq_len = position_ids.size()`, then `table.index_select(0, "
        "positions.view(-1)).view(bsz, seq_len, dim)` (XGLM's sinusoidal embedding). The engine's "
        "positions are flat, (tokens,), where the two-way unpack fails: it goes, and the restoring "
        "view keeps the tokens flat, `.view(-1, dim)`."
    )
    examples = [
        Example(
            "class Pos(nn.Module):\n    def forward(self, positions):\n"
            "        bsz, seq_len = positions.size()\n        positions = positions + self.offset\n"
            "        return self.weights.index_select(0, positions.view(-1)).view(bsz, seq_len, self.dim)\n",
            "class Pos(nn.Module):\n    def forward(self, positions):\n"
            "        positions = positions + self.offset\n"
            "        return self.weights.index_select(0, positions.view(-1)).view(-1, self.dim)\n",
        ),
    ]

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        if not self.kept(cls) or len(self.scope) != 1 or updated.name.value != "forward" \
                or "positions" not in param_names(updated):
            return updated
        body = list(updated.body.body)
        unpack = next((st for st in body if m.matches(st, m.SimpleStatementLine(body=[m.Assign(
            targets=[m.AssignTarget(m.Tuple([m.Element(m.Name()), m.Element(m.Name())]))], value=_SIZE)]))), None)
        if unpack is None:
            return updated
        dims = assigned_names(unpack.body[0].targets[0].target)  # type: ignore[attr-defined]
        rest = [st for st in body if st is not unpack]
        uses = [n for st in rest for n in findall(st, m.Name()) if n.value in dims]  # type: ignore[attr-defined]
        views = findall(cst.Module(body=rest), m.Call(func=m.Attribute(attr=m.Name("view") | m.Name("reshape"))))
        lead = [v for v in views if len(v.args) > 2 and [code(a.value) for a in v.args[:2]] == dims]  # type: ignore[attr-defined]
        if len(uses) != 2 * len(lead) or not lead:
            return updated  # the sizes serve something else too

        class _Flat(cst.CSTTransformer):
            def leave_Call(self, o, u):
                if any(o is v for v in lead):
                    return u.with_changes(args=[cst.Arg(cst.parse_expression("-1")).with_changes(comma=u.args[1].comma), *u.args[2:]])
                return u

        new = [st.visit(_Flat()) for st in rest]
        self.mark(f"{cls}.forward")
        return updated.with_changes(body=updated.body.with_changes(body=new))
