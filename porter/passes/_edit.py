"""Small statement edits that rules of several families share."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m


def append_to_init(fn: cst.FunctionDef, stmts: list[cst.BaseStatement]) -> cst.FunctionDef:
    """`fn` with `stmts` appended to its body."""
    return fn.with_changes(body=fn.body.with_changes(body=[*fn.body.body, *stmts]))


def is_assign_of(st: cst.CSTNode, attr: str) -> bool:
    """`st` is `self.<attr> = ...`."""
    return m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(
        target=m.Attribute(value=m.Name("self"), attr=m.Name(attr)))])]))
