"""Text-only positions an M-RoPE rotary receives: one row copied to every axis, shown by running
the code that builds them.

A rotary that splits its table into sections and takes each section from one axis of positions
(CohereCompass's M-RoPE) computes the standard table when every axis holds the same positions.
Either the rotary copies one row to every axis itself (`position_ids.expand(3, -1, -1)` on a
(batch, tokens) tensor: rope_order.recomposed_in_order reads it), or the model hands it axes it
built (transformers 5.17/5.18: `position_ids.view(1, 1, -1).expand(4, batch, -1)`, then
`position_ids[1:]`). This module shows the second case by running the model's forward up to the
rotary call on index arrays (porter/analysis/layout_interp.py): the positions are every distinct
label, the text-only inputs are those of a causal LM's call (`position_ids` absent or
(batch, tokens), embeddings given, nothing else), and what reaches the rotary must be the
positions on every axis. Nothing is imported or executed; anything the interpreter does not model
leaves the positions unknown, and the rotary stays refused.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m
import numpy as np

from porter.analysis.dataflow import forward_flow
from porter.analysis.cstutil import assigned_names, findall, names_in, param_names
from porter.analysis.index import ClassInfo, ModelIndex
from porter.analysis.layout_interp import Interp, bound_in
from porter.analysis.symeval import Frame, Opaque, Unknown

_BATCH, _TOKENS, _HIDDEN = 2, 5, 8
# the keywords every causal LM's base model is called with (HF's interface, not a construct)
_POSITIONS, _EMBEDS = "position_ids", "inputs_embeds"


class _PositionsInterp(Interp):
    """The layout interpreter, plus what building positions needs: `torch.arange(n)` and an
    integer offset added to an index array (`arange(...) + past_seen_tokens`)."""

    def call(self, c: cst.Call, env: dict):
        if m.matches(c.func, m.Attribute(value=m.Name("torch"), attr=m.Name("arange"))):
            ints = [self.expr(a.value, env) for a in c.args if a.keyword is None]
            if not ints or len(ints) > 2 or not all(type(i) is int for i in ints):
                raise Unknown("torch.arange")
            return np.arange(*ints)
        return super().call(c, env)

    def expr(self, e: cst.BaseExpression, env: dict):
        if isinstance(e, cst.BinaryOperation) and isinstance(e.operator, (cst.Add, cst.Subtract)):
            a, b = self.expr(e.left, env), self.expr(e.right, env)
            if isinstance(a, np.ndarray) and type(b) is int:
                return a + b if isinstance(e.operator, cst.Add) else a - b
            if isinstance(b, np.ndarray) and type(a) is int and isinstance(e.operator, cst.Add):
                return a + b
        return super().expr(e, env)


def _no_self(name: str):
    raise Unknown(f"self.{name}")


def _rotary_calls(st: cst.CSTNode, attr: str) -> list[cst.Call]:
    return findall(st, m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(attr))))  # type: ignore[return-value]


def _comprehension_bound(st: cst.CSTNode) -> set[str]:
    return {n for f in findall(st, m.CompFor()) for n in assigned_names(f.target)}  # type: ignore[attr-defined]


def _handed(fwd: cst.FunctionDef, attr: str, slot: int, positions) -> list:
    """What each call `self.<attr>(...)` in FWD receives in its SLOT-th argument, run with the
    text-only inputs (positions POSITIONS); Unknown where it cannot be evaluated."""
    interp = _PositionsInterp(_no_self, lambda _name: None, {})
    params = param_names(fwd)[1:]
    env: dict[str, object] = {p: None for p in params}
    env[_EMBEDS] = Opaque((_BATCH, _TOKENS, _HIDDEN))
    env[_POSITIONS] = positions
    frame = Frame(env)
    out: list = []
    for st in fwd.body.body:  # type: ignore[attr-defined]
        if frame.done:
            break
        for call in _rotary_calls(st, attr):
            args = [a for a in call.args if a.keyword is None and not a.star]
            if len(args) <= slot:
                out.append(Unknown("positions not passed by position"))
                continue
            arg = args[slot].value
            if names_in(arg) & (bound_in(st) | _comprehension_bound(st)):
                out.append(Unknown("positions bound where the rotary is called"))
                continue
            try:
                out.append(interp.expr(arg, frame.env))
            except Unknown as exc:
                out.append(exc)
        interp.statement(st, frame)
    return out


def _read_slots(rotary: ClassInfo) -> list[int]:
    """The positional slots (after self) of the rotary forward's parameters whose values reach
    what it returns (its dtype and device excluded: the hidden states only lend those)."""
    fwd = rotary.method("forward")
    if fwd is None:
        return []
    flow = forward_flow(fwd, set(), lambda _call: False)
    read = set().union(*flow.returns) if flow.returns else set()
    return [i for i, p in enumerate(param_names(fwd)[1:]) if f"param:{p}" in read]


def hands_copied_axes(idx: ModelIndex, rotary: ClassInfo) -> bool:
    """Every model class that builds ROTARY calls it, for text-only inputs, with copies of the
    positions (an (axes, batch, tokens) tensor whose every row is the positions) in one argument
    the rotary reads, the same in every call."""
    slots = [s for s in _read_slots(rotary) if _copies_in(idx, rotary, s)]
    return len(slots) == 1


def _copies_in(idx: ModelIndex, rotary: ClassInfo, slot: int) -> bool:
    labels = np.arange(_BATCH * _TOKENS).reshape(_BATCH, _TOKENS) + 7  # every position its own label
    default = np.broadcast_to(np.arange(_TOKENS), (_BATCH, _TOKENS))  # no positions given: 0 .. n-1
    seen = False
    for info in idx.classes.values():
        for attr, sub in info.submodules.items():
            if sub.ctor != rotary.name:
                continue
            fwd = info.method("forward")
            if fwd is None or _POSITIONS not in param_names(fwd) or _EMBEDS not in param_names(fwd):
                return False
            for given, want in ((None, default), (labels, labels)):
                handed = _handed(fwd, attr, slot, given)
                if not handed or not all(
                        isinstance(v, np.ndarray) and v.ndim == 3 and v.shape[1:] == (_BATCH, _TOKENS)
                        and np.array_equal(v, np.broadcast_to(want, v.shape)) for v in handed):
                    return False
            seen = True
    return seen
