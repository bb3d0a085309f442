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


# the tensor the filter of load_weights hands on (templates/load_weights.py.j2: `port_weights`)
FILTER = "port_weights"
_HAND_ON = m.SimpleStatementLine(body=[m.Expr(m.Yield(m.Tuple(elements=[
    m.Element(m.Name("name")), m.Element(m.Name("loaded_weight"))])))])


def add_to_filter(fn: cst.FunctionDef, stmts: list[cst.BaseStatement]) -> cst.FunctionDef | None:
    """`port_weights` with `stmts` run on each tensor just before it is handed on to the engine's
    loader (after what the template does to it); None when FN is not that filter's loop."""
    loop = next((st for st in fn.body.body if isinstance(st, cst.For)), None)
    if fn.name.value != FILTER or loop is None or not any(m.matches(st, _HAND_ON) for st in loop.body.body):
        return None
    inner: list[cst.BaseStatement] = []
    for st in loop.body.body:
        if m.matches(st, _HAND_ON):
            inner.extend(stmts)
        inner.append(st)
    new_loop = loop.with_changes(body=loop.body.with_changes(body=inner))
    return fn.with_changes(body=fn.body.with_changes(body=[new_loop if st is loop else st for st in fn.body.body]))
