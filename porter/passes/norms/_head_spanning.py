"""Norms that span the heads of a projection (q/k norms over all heads): the facts PT120 and
PT022 both read."""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst

from porter.analysis.cstutil import code
from porter.plan import linear_args


@dataclass(frozen=True)
class HeadSpanningNorm:
    attr: str
    kv: bool  # normalises k (else q)
    per_head: bool  # one weight per head (else one norm over the whole projection width)


def head_spanning_norms(ctx, cls: str) -> dict[str, HeadSpanningNorm]:
    """Cached per conversion: several rules ask for every call in an attention's forward."""
    key = ("head_spanning_norms", cls)
    if key not in ctx.memo:
        ctx.memo[key] = _head_spanning_norms(ctx, cls)
    return ctx.memo[key]


def _head_spanning_norms(ctx, cls: str) -> dict[str, HeadSpanningNorm]:
    """Norm sub-modules of an attention class whose parameters span its heads, read from the HF
    source: built over the full output width of the q or k projection (`Norm(num_heads *
    head_dim)`), or with the head count among their arguments (`Norm((num_heads, head_dim))`,
    `NormPerHead(head_dim, num_heads)`)."""
    attn = ctx.plan.attention(cls)
    info = ctx.idx.classes.get(cls)
    if attn is None or info is None or attn.packed:
        return {}
    widths = {}
    for proj, kv in ((attn.q, False), (attn.k, True)):
        sub = info.submodules.get(proj)
        if sub is not None:
            widths.setdefault(linear_args(sub.call)[1], kv)
    found = {}
    for attr, sub in info.submodules.items():
        if attr in (attn.q, attn.k, attn.v, attn.o) or not sub.call.args:
            continue
        if not (sub.ctor in ctx.plan.norms or "norm" in (sub.ctor or "").lower()):
            continue
        first = code(sub.call.args[0].value)
        if first in widths:
            found[attr] = HeadSpanningNorm(attr, widths[first], per_head=False)
            continue
        mentioned = set()  # arguments that are a head count, alone or as an element of a shape tuple
        for a in sub.call.args:
            elements = a.value.elements if isinstance(a.value, cst.Tuple) else [a]
            mentioned.update(code(e.value) for e in elements)
        if attn.num_kv_heads in mentioned and attn.num_kv_heads != attn.num_heads:
            found[attr] = HeadSpanningNorm(attr, True, per_head=True)
        elif attn.num_heads in mentioned:
            found[attr] = HeadSpanningNorm(attr, False, per_head=True)
    return found
