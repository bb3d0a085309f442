"""Positions a module builds itself from the length of its input and the cache's length, shown by
running its forward on sample sizes.

BART-style learned position embeddings (TrOCR's, transformers 5.x) take the input ids and the
cache length and, when no positions are given, build `arange(past, past + seq_len)` for every
row of the batch. Those are the absolute positions of the new tokens: the engine's `positions`.
This module runs the forward's statements (porter/analysis/layout_interp.py, nothing imported or
executed) with one parameter a (batch, tokens) tensor known by its shape only, another the cache
length, the rest absent (None), for two cache lengths; the positions are the local that then holds
`past, past + 1, ..., past + tokens - 1` in every row. Anything the interpreter does not model
leaves the module as it is.
"""

from __future__ import annotations

import libcst as cst
import numpy as np

from porter.analysis.cstutil import names_in, param_names
from porter.analysis.layout_interp import bound_in
from porter.analysis.position_axes import _PositionsInterp
from porter.analysis.symeval import Frame, Opaque, Unknown

_BATCH, _TOKENS = 2, 5
_PASTS = (0, 3)  # two cache lengths: the positions must follow the one handed in


def _no_self(name: str):
    raise Unknown(f"self.{name}")


def _is_docstring(st: cst.BaseStatement) -> bool:
    return isinstance(st, cst.SimpleStatementLine) and len(st.body) == 1 and isinstance(
        st.body[0], cst.Expr) and isinstance(st.body[0].value, (cst.SimpleString, cst.ConcatenatedString))


def _first_positions(fn: cst.FunctionDef, params: list[str], src: str, past: str, p: int) -> tuple[int, str] | None:
    """(index of the statement, name) after which a local first holds the positions of a
    (batch, tokens) input SRC behind a cache of length P (handed in as PAST)."""
    want = np.broadcast_to(np.arange(p, p + _TOKENS), (_BATCH, _TOKENS))
    env: dict[str, object] = {q: None for q in params}
    env[src], env[past] = Opaque((_BATCH, _TOKENS)), p
    frame = Frame(env)
    interp = _PositionsInterp(_no_self, lambda _name: None, {})
    for i, st in enumerate(fn.body.body):  # type: ignore[attr-defined]
        interp.statement(st, frame)
        if frame.done:
            return None
        for name in sorted(bound_in(st)):
            v = frame.env.get(name)
            if isinstance(v, np.ndarray) and v.shape in {(_BATCH, _TOKENS), (1, _TOKENS), (_TOKENS,)} \
                    and np.array_equal(np.broadcast_to(v, want.shape), want):
                return i, name
    return None


def arange_positions(fn: cst.FunctionDef) -> tuple[str, set[str], list[int]] | None:
    """(the positions' name, the parameters only they read, the indices of the statements computing
    them) when FN builds the positions of its input's tokens from the input's length and a cache
    length it is handed (`arange(past, past + seq_len)`), and what follows reads neither."""
    params = [q for q in param_names(fn) if q != "self"]
    body = list(fn.body.body)  # type: ignore[attr-defined]
    read_in_body = names_in(fn.body)
    used = [q for q in params if q in read_in_body]  # positions of SRC behind PAST read both
    for src in used:
        for past in used:
            if past == src:
                continue
            try:
                hit = _first_positions(fn, params, src, past, _PASTS[0])
                # the same statement and name for every cache length (none found: no need to ask)
                if hit is None or any(_first_positions(fn, params, src, past, p) != hit for p in _PASTS[1:]):
                    continue
            except Unknown:
                continue
            at, pos = hit
            steps = [i for i in range(at + 1) if not _is_docstring(body[i])]
            rest = [st for i, st in enumerate(body) if i not in steps]
            read = set().union(set(), *(names_in(st) for st in rest))
            made = set().union(set(), *(bound_in(body[i]) for i in steps))
            if pos not in read or (read & made) - {pos} or {src, past} & (read - {pos}):
                continue  # what builds the positions serves something else too
            gone = {q for q in params if q == pos or q not in read}
            return pos, gone, steps
    return None
