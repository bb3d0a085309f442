"""The plan's derived facts: what the passes read about the kept code, computed once when the
plan is finished (porter/plan/model.py marks these fields `derived`; PORT.json leaves them out)."""

from __future__ import annotations

import dataclasses

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, dotted, findall
from porter.analysis.index import ModelIndex
from porter.analysis.layouts import layout_helper_methods, linear_args, position_factor_helpers
from porter.plan.model import HeadSpanningNorm, PortPlan
from porter.rules_data import StripTable


def derive(plan: PortPlan, idx: ModelIndex, table: StripTable) -> None:
    """Fill PLAN's derived fields (before it is sealed)."""
    plan.strip = strip_for(plan, idx, table)
    plan.head_norms = {a.cls: norms for a in plan.attentions if (norms := head_spanning_norms(plan, idx, a.cls))}
    plan.layout_helpers = {c: helpers for c, info in idx.classes.items() if (helpers := layout_helper_methods(info))}
    plan.position_factors = position_factor_helpers(idx, plan.classes)
    plan.alibi_tests = {a.cls: (a.alibi, a.alibi_when) for a in plan.attentions if a.alibi and a.alibi_when}


def strip_for(plan: PortPlan, idx: ModelIndex, table: StripTable) -> StripTable:
    """The strip table of this model: an ALiBi bias the engine's Attention adds itself (slopes,
    PT021) is HF-only from here on, and so are the callables that build it; so is a cos/sin cache
    threaded down the layers under a name of the model's own (remote code's `rotary_pos_emb`) once
    the engine rotates from positions (porter/analysis/rotary_module.py)."""
    from porter.analysis.rotary_module import table_params

    tables = set()
    for a in plan.attentions:
        if a.rope and a.rope_helper:
            tables |= table_params(idx.classes[a.cls].method("forward"), a.rope_helper)
    tables |= {a.kv_param for a in plan.attentions if a.kv_param}  # KV sharing: the engine's cache hands k/v over (PT291)
    tables -= table.strip_params | set(table.rename_params)
    if tables:
        table = dataclasses.replace(table, strip_params=table.strip_params | tables)
    alibi = {a.alibi for a in plan.attentions if a.alibi}
    if not alibi:
        return table
    producers = alibi_producers(idx, plan)
    return dataclasses.replace(
        table, strip_params=table.strip_params | alibi, hf_only_callables=table.hf_only_callables | producers,
        drop_methods=table.drop_methods | {p.split(".", 1)[1] for p in producers if p.startswith("self.")})


def alibi_producers(idx: ModelIndex, plan: PortPlan) -> set[str]:
    """The callables whose result the kept forwards bind to an ALiBi bias name (`alibi =
    self.build_alibi_tensor(mask, ...)`): the engine's Attention adds the bias from its slopes, so
    they are HF-only in the port."""
    names = {a.alibi for a in plan.attentions if a.alibi}
    out: set[str] = set()
    for cls in plan.classes if names else []:
        fwd = idx.classes[cls].method("forward")
        for node in findall(fwd, m.Assign(targets=[m.AssignTarget(m.Name(m.MatchIfTrue(lambda n: n in names)))],
                                          value=m.Call())) if fwd else []:
            if (name := dotted(node.value.func)) is not None:  # type: ignore[attr-defined]
                out.add(name)
    return out


def head_spanning_norms(plan: PortPlan, idx: ModelIndex, cls: str) -> dict[str, HeadSpanningNorm]:
    """Norm sub-modules of an attention class whose parameters span its heads, read from the HF
    source: built over the full output width of the q or k projection (`Norm(num_heads *
    head_dim)`), or with the head count among their arguments (`Norm((num_heads, head_dim))`,
    `NormPerHead(head_dim, num_heads)`)."""
    attn = plan.attention(cls)
    info = idx.classes.get(cls)
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
        if not (sub.ctor in plan.norms or "norm" in (sub.ctor or "").lower()):
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
