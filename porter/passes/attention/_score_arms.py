"""What the rules that settle an `if` inside hand-written attention share (PT156, PT157): a block
with some of its `if` statements replaced by the arm that runs when the engine serves, keeping
the source's line numbers before indexing."""

from __future__ import annotations

from collections.abc import Callable

import libcst as cst

from porter.analysis.cstutil import findall
from porter.passes.attention._common import in_place_of, nlines
from porter.passes.attention._inline_dataflow import SOFTMAX, _matmul


def computes_softmax(fn: cst.FunctionDef) -> bool:
    """The method takes a softmax itself: the scores of an attention computed inline."""
    return bool(findall(fn, SOFTMAX))


def score_steps(body: list[cst.BaseStatement]) -> set[int]:
    """The ids of the statements of a block after the first that computes a matmul (the scores) and
    before the first that takes a softmax."""
    lo = next((i for i, st in enumerate(body) if isinstance(st, cst.SimpleStatementLine) and any(
        isinstance(s, (cst.Assign, cst.AugAssign)) and _matmul(s.value) is not None for s in st.body)), None)
    hi = next((i for i, st in enumerate(body) if findall(st, SOFTMAX)), None)
    if lo is None or hi is None:
        return set()
    return {id(st) for st in body[lo + 1:hi]}


def keep_arms(block: cst.IndentedBlock, pick: Callable[[cst.BaseStatement], list[cst.BaseStatement] | None],
              keep_lines: bool) -> cst.IndentedBlock | None:
    """`block` with each statement `pick` settles replaced by the arm it returns (an empty arm: the
    statement goes); None when nothing changed or the block would be left empty. With `keep_lines`
    the removed lines become blank lines, so every later line keeps its number."""
    out: list[cst.BaseStatement] = []
    pad = 0
    changed = False
    for st in block.body:
        arm = pick(st)
        if arm is None:
            if pad:
                st = st.with_changes(leading_lines=[*([cst.EmptyLine()] * pad), *st.leading_lines])
                pad = 0
            out.append(st)
            continue
        changed = True
        if not arm:
            pad += nlines(st) if keep_lines else 0
            continue
        arm = in_place_of(st, arm, keep_lines)
        if pad:
            arm[0] = arm[0].with_changes(leading_lines=[*([cst.EmptyLine()] * pad), *arm[0].leading_lines])
            pad = 0
        out.extend(arm)
    if not changed or not out:
        return None
    footer = [*([cst.EmptyLine()] * pad), *block.footer]
    return block.with_changes(body=out, footer=footer)
