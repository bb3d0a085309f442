"""Steps between the base model and lm_head that leave what the logits see as it is (PT050 reads through them)."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import findall


def selects_positions(value: cst.BaseExpression, name: str, plumbing) -> bool:
    """VALUE picks the positions HF computes logits for out of NAME: a call that takes NAME first
    and otherwise only HF's plumbing (`slice_logits_to_keep(hidden_states, logits_to_keep)`, the
    helper 5.25 writes instead of `hidden_states[:, slice_indices, :]`). The engine hands
    compute_logits the positions it samples, so the selection is the engine's own."""
    if not (isinstance(value, cst.Call) and value.args and value.args[0].keyword is None
            and m.matches(value.args[0].value, m.Name(name))):
        return False
    rest = {n.value for a in value.args[1:] for n in findall(a.value, m.Name())}  # type: ignore[attr-defined]
    return bool(rest) and rest <= set(plumbing) and name not in rest


def passes_through(value: cst.BaseExpression, name: str, plumbing) -> bool:
    """`NAME = VALUE` leaves the hidden states as the logits processor sees them: a position selection,
    or a move or cast (`.to(self.lm_head.weight.device)`; the logits processor computes in float32)."""
    return selects_positions(value, name, plumbing) or m.matches(value, m.Call(func=m.Attribute(
        value=m.Name(name), attr=m.Name("to") | m.Name("float") | m.Name("contiguous"))))
