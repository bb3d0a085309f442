"""The machinery of PT226 cache-arm (the arms of an input the port never has; PT157 does the same
for the absent inputs between the softmax and the weighted sum): `if X is not None:` / `elif X is not None:` on such an input becomes the arm
that runs when X is None, before indexing, keeping the source's line numbers."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import param_names
from porter.passes.attention._common import BeforeIndexRule, nlines

# `X is None` / `X is not None` on a bare name
NONE_TEST = m.Comparison(left=m.Name(), comparisons=[m.ComparisonTarget(m.Is() | m.IsNot(), m.Name("None"))])


class AbsentArmRule(BeforeIndexRule):
    """Subclasses say which parameters of a method are None in the port (`absent`)."""

    visits_dropped_code = True
    word = "softmax"  # before indexing: only the top-level statements naming it are walked

    def absent(self, names: set[str]) -> set[str]:
        raise NotImplementedError

    def visit_FunctionDef(self, node):
        if len(self.scope) == 1:
            self._absent = self.absent(set(param_names(node)))
        return super().visit_FunctionDef(node)

    def _none(self, test: cst.BaseExpression) -> bool | None:
        """True for `X is None`, False for `X is not None` on an absent X, else None."""
        if not m.matches(test, NONE_TEST) or test.left.value not in getattr(self, "_absent", ()):  # type: ignore[attr-defined]
            return None
        return isinstance(test.comparisons[0].operator, cst.Is)  # type: ignore[attr-defined]

    drops_writes = False  # True: a statement that only re-binds an absent input goes too (HF's cache output)
    drops_lone_arms = True  # False: an `if X is not None:` with no `else` stays (PT011 drops it later)

    def _write(self, st: cst.BaseStatement) -> bool:
        """`past_key_value = (k, v)`, or an `if` holding only such statements (`if self.is_decoder:`)."""
        if not self.drops_writes:
            return False
        if isinstance(st, cst.If) and st.orelse is None:  # (its block may be left `pass` by the writes gone)
            return all(self._write(x) or m.matches(x, m.SimpleStatementLine(body=[m.Pass()])) for x in st.body.body)
        return m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name(
            m.MatchIfTrue(lambda n: n in getattr(self, "_absent", ()))))])]))

    def _arm(self, st: cst.BaseStatement) -> list[cst.BaseStatement] | None:
        """The statements that run in place of `st` when its absent input is None (None: `st` is no such test)."""
        if self._write(st):
            return []
        if not isinstance(st, cst.If) or isinstance(st.orelse, cst.If) or (is_none := self._none(st.test)) is None:
            return None
        if st.orelse is None and not self.drops_lone_arms:
            return None
        if is_none:
            return list(st.body.body)
        return list(st.orelse.body.body) if st.orelse is not None else []

    def _pad(self, n: int) -> list[cst.EmptyLine]:
        return [cst.EmptyLine()] * n if self.keep_lines else []

    def leave_If(self, original, updated):
        """`elif X is not None: A <rest>` -> `<rest>`; `elif X is None: A <rest>` -> `else: A`."""
        if len(self.scope) < 2 or not isinstance(updated.orelse, cst.If) or (is_none := self._none(updated.orelse.test)) is None:
            return updated
        link = updated.orelse
        if is_none:
            gone = nlines(link) - nlines(link.body) - (nlines(link.orelse) if link.orelse is not None else 0)
            return updated.with_changes(orelse=cst.Else(body=link.body, leading_lines=[*link.leading_lines, *self._pad(gone)]))
        rest = link.orelse
        gone = nlines(link) - (nlines(rest) if rest is not None else 0)
        if rest is None:  # the lines stay at the end of the arm before
            body = updated.body.with_changes(footer=[*updated.body.footer, *self._pad(gone)])
            return updated.with_changes(body=body, orelse=None)
        return updated.with_changes(orelse=rest.with_changes(leading_lines=[*self._pad(gone), *rest.leading_lines]))

    def leave_IndentedBlock(self, original, updated):
        if len(self.scope) < 2 or not getattr(self, "_absent", None):
            return updated
        out: list[cst.BaseStatement] = []
        pad: list[cst.EmptyLine] = []  # the lines of a removed arm, kept before what follows
        changed = False
        for st in updated.body:
            arm = self._arm(st)
            if arm is None:
                if pad:
                    st = st.with_changes(leading_lines=[*pad, *st.leading_lines])
                    pad = []
                out.append(st)
                continue
            changed = True
            gone = self._pad(nlines(st) - sum(nlines(a) for a in arm))
            if arm:
                arm[0] = arm[0].with_changes(leading_lines=[*pad, *gone, *arm[0].leading_lines]
                                             if self.keep_lines else st.leading_lines)
                out.extend(arm)
                pad = []
            else:
                pad = [*pad, *gone]
        if not changed:
            return updated
        if not out:
            out = [cst.SimpleStatementLine([cst.Pass()])]
        return updated.with_changes(body=out, footer=[*pad, *updated.footer])  # a last arm's lines stay
