"""A rotary table that is the standard one in another order, and the order, as code to replay.

CohereCompass builds the standard inverse frequencies and then writes them into a new table in
another order (`t = torch.empty_like(inv_freq); t[:hw] = torch.cat([inv_freq[:hw][0::2],
inv_freq[:hw][1::2]]); t[-n:] = inv_freq[-n:]`), so the pair (j, j + half) of a head turns at the
standard frequency of another index, order[j]. The engine's get_rope turns pair j at frequency j.
Moving each rotated half of every q/k head to the engine's order when loading (the row at j goes
to order[j]) makes the engine rotate each pair as HF does; q . k is a sum over the pairs, so the
same move of q and k leaves the scores unchanged. Exact: a permutation of rows.

The order is not computed here: the statements that fill the table are replayed on the indices
(`inv_freq = torch.arange(half)`) in the port's attention, with the config it is built from. So
only statements that move entries are admitted: slices, `torch.cat` and `torch.empty_like` of the
table; the sizes they use come from the config (read by the other statements replayed).

When the rotary forward splits cos/sin by these sections again and takes each section from an
axis of positions (M-RoPE), text-only positions are one row copied to every axis
(`position_ids.expand(3, -1, -1)` in the rotary, or built so by the model before it calls the
rotary: porter/analysis/position_axes.py): putting the sections back together in their order restores the
table, which `recomposed_in_order` checks.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, findall, names_in, param_names
from porter.analysis.index import ClassInfo

_EMPTY_LIKE = m.Call(func=m.Attribute(value=m.Name("torch"), attr=m.Name("empty_like")), args=[m.Arg(m.Name())])
_MOVES = frozenset({"cat", "empty_like"})  # the only calls a moved entry passes through


def _assigned(st: cst.BaseStatement) -> list[str]:
    if not m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())])])):
        return []
    return [st.body[0].targets[0].target.value]  # type: ignore[attr-defined]


def _fills(st: cst.BaseStatement, table: str) -> bool:
    """`table[...] = ...`"""
    return m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(
        m.Subscript(value=m.Name(table)))])]))


def _only_moves(value: cst.BaseExpression, source: str) -> bool:
    """The entries of `source` sliced and concatenated, nothing computed from them."""
    calls = findall(value, m.Call())
    if any(not m.matches(c.func, m.Attribute(value=m.Name("torch"), attr=m.Name(  # type: ignore[attr-defined]
            m.MatchIfTrue(lambda n: n in _MOVES)))) for c in calls):
        return False
    return not findall(value, m.BinaryOperation(left=m.Name(source)) | m.BinaryOperation(right=m.Name(source)))


class _Key(cst.CSTTransformer):
    """`config.rope_parameters[<param>]` by the layer's rope_parameters expression."""

    def __init__(self, param: str | None, params: cst.BaseExpression) -> None:
        self.param, self.params = param, params

    def leave_Subscript(self, original, updated):
        if self.param and m.matches(updated, m.Subscript(
                value=m.Attribute(value=m.Name("config"), attr=m.Name("rope_parameters")),
                slice=[m.SubscriptElement(m.Index(m.Name(self.param)))])):
            return self.params
        return updated


def table_order(info: ClassInfo, params: str, half: str) -> list[str] | None:
    """The statements that rebuild, on `inv_freq = torch.arange(<half>)`, the order in which
    `info`'s rotary writes its inverse frequencies into a new table, ending with `order = ...`;
    `params` is the layer's rope_parameters (read where the rotary reads
    `config.rope_parameters[layer_type]`). None when no method rearranges its table so."""
    for fn in findall(info.node, m.FunctionDef()):
        body = list(fn.body.body)  # type: ignore[attr-defined]
        made = [(i, st) for i, st in enumerate(body) if m.matches(st, m.SimpleStatementLine(
            body=[m.Assign(targets=[m.AssignTarget(m.Name())], value=_EMPTY_LIKE)]))]
        if len(made) != 1:
            continue
        start, st = made[0]
        table = _assigned(st)[0]
        source = st.body[0].value.args[0].value.value  # type: ignore[attr-defined]
        fills = [s for s in body[start + 1:] if _fills(s, table)]
        if not fills or not all(_only_moves(s.body[0].value, source) for s in fills):  # type: ignore[attr-defined]
            return None
        # what the fills read besides the two tables, back to the config: replayed as is
        needed = set().union(*(names_in(s) for s in fills)) - {table, source, "torch"}
        kept: list[cst.BaseStatement] = []
        for s in reversed(body[:start]):
            if set(_assigned(s)) & needed:
                if source in names_in(s) or table in names_in(s):
                    return None
                kept.insert(0, s)
                needed |= names_in(s)
        others = [p for p in param_names(fn) if p not in ("self", "config", "device", "kwargs")]
        key = _Key(others[0] if len(others) == 1 else None, cst.parse_expression(params))
        lines = [f"{source} = torch.arange({half})"]
        for s in [*kept, st, *fills]:
            lines.append(code(s.with_changes(leading_lines=[]).visit(key)).strip())
        if not names_in(cst.parse_module("\n".join(lines) + "\n")) <= (
                {"torch", "config", "layer_idx", "half", source, table} | {n for s in kept for n in _assigned(s)}):
            return None
        return [*lines, f"order = {table}"]
    return None


def recomposed_in_order(info: ClassInfo, handed_copies: bool = False) -> bool:
    """Every method that splits a table into sections (`freq.split(sections, dim=-1)`) takes each
    section from one axis of positions copied to every axis (`position_ids.expand(n, -1, -1)` in
    the forward, or HANDED_COPIES: the model hands the rotary the positions on every axis,
    porter/analysis/position_axes.py) and concatenates the sections back in their order."""
    fwd = info.method("forward")
    copies = handed_copies or fwd is not None and bool(findall(fwd, m.Call(
        func=m.Attribute(attr=m.Name("expand")), args=[m.Arg(m.Integer()), m.AtLeastN(
            m.Arg(m.UnaryOperation(operator=m.Minus(), expression=m.Integer("1"))), n=1)])))
    for fn in findall(info.node, m.FunctionDef()):
        splits = findall(fn, m.Call(func=m.Attribute(attr=m.Name("split"))))
        if not splits:
            continue
        if not copies:
            return False
        unpack = findall(fn, m.Assign(targets=[m.AssignTarget(m.Tuple())], value=m.GeneratorExp(
            elt=m.Subscript(slice=[m.SubscriptElement(m.Index())]))))
        if len(unpack) != 1 or len(splits) != 1:
            return False
        pieces = [e.value.value for e in unpack[0].targets[0].target.elements]  # type: ignore[attr-defined]
        if not _cat_in_order(fn, pieces):
            return False
    return True


def _cat_in_order(fn: cst.CSTNode, pieces: list[str]) -> bool:
    """The pieces concatenated along the last axis, each once, in their order (through locals)."""
    locals_: dict[str, list[str]] = {p: [p] for p in pieces}
    for a in findall(fn, m.Assign(targets=[m.AssignTarget(m.Name())], value=m.Call(
            func=m.Attribute(value=m.Name("torch"), attr=m.Name("cat"))))):
        parts = a.value.args[0].value  # type: ignore[attr-defined]
        if not isinstance(parts, (cst.List, cst.Tuple)) or not all(
                isinstance(e.value, cst.Name) and e.value.value in locals_ for e in parts.elements):
            continue
        locals_[a.targets[0].target.value] = [p for e in parts.elements for p in locals_[e.value.value]]  # type: ignore[attr-defined]
    return any(seq == pieces for name, seq in locals_.items() if name not in pieces)


def rows_move_freely(info: ClassInfo, projections: set[str]) -> bool:
    """The attention's forward calls no module of its own but its projections (no norm over a
    head's channels, whose weight would have to move with the rows)."""
    fwd = info.method("forward")
    if fwd is None:
        return False
    called = {c.func.attr.value for c in findall(fwd, m.Call(  # type: ignore[attr-defined]
        func=m.Attribute(value=m.Name("self"), attr=m.Name())))}
    return called <= projections
