"""A packed q/k/v projection grouped per KV head: `[kv_heads, q_per_kv + 2, head_dim]`.

Falcon's `_split_heads` picks one of three views of the fused `query_key_value` output from the
config (`new_decoder_architecture`, `multi_query`, neither). Each is the one grouped layout: per
group of query heads its q slots, then one k and one v slot:

    x.view(b, s, -1, H // KV + 2, d); q = x[..., :-2, :]; k = x[..., [-2], :]; v = x[..., [-1], :]
    x.view(b, s, H + 2, d)            (one group: multi-query)
    x.view(b, s, H, 3, d); q, k, v = x[..., 0, :], x[..., 1, :], x[..., 2, :]   (H groups of 1)

`grouped_split(info, attr)` reads every arm of such a helper statically and returns its name and
the total query heads all arms agree on, or None when any arm is something else.
"""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, findall
from porter.analysis.index import ClassInfo

# calls that change only the layout of a q/k/v pick (the broadcast expands KV heads to GQA width)
_LAYOUT = frozenset({"flatten", "broadcast_to", "expand", "reshape", "view", "transpose", "contiguous"})


@dataclass(frozen=True)
class GroupedSplit:
    helper: str  # the method splitting the fused output
    num_heads: str  # total query heads, the same in every arm


@dataclass(frozen=True)
class _View:
    dims: tuple[str, ...]  # the view's sizes after the batch dims: ([groups,] slots, head_dim)


@dataclass(frozen=True)
class _Pick:
    view: _View
    slot: str  # "q" (slots[:-2] or index 0 of 3), "k" ([-2] / 1), "v" ([-1] / 2)


def _arms(body: list[cst.BaseStatement]) -> list[list[cst.BaseStatement]] | None:
    """The straight-line statement lists of an if/elif/else chain ending the body (each arm ends in a return)."""
    head = [st for st in body if not m.matches(st, m.SimpleStatementLine(body=[m.Expr(m.SimpleString())]))]
    if head and isinstance(head[-1], cst.If):
        node: cst.If | cst.Else | None = head[-1]
        arms = []
        while isinstance(node, cst.If):
            arms.append(head[:-1] + list(node.body.body))
            node = node.orelse  # type: ignore[assignment]
        if node is None:
            return None
        arms.append(head[:-1] + list(node.body.body))
        return arms
    return [head]


def _slot(sub: cst.Subscript, view: _View) -> str | None:
    """Which slot a subscript of the view picks: only the slots axis (the one before head_dim) is indexed."""
    els = [e.slice for e in sub.slice]
    full = [isinstance(s, cst.Slice) and s.lower is None and s.upper is None and s.step is None for s in els]
    if els and isinstance(els[0], cst.Index) and m.matches(els[0].value, m.Ellipsis()):
        pos = len(els) - 1 - 1  # elements after `...` count from the end: the slot one is second to last
        if len(els) != 3 or not full[2]:
            return None
    else:
        pos = len(view.dims) + 2 - 2  # batch and sequence dims first; head_dim last (may be left out)
        if len(els) not in (pos + 1, pos + 2) or not all(full[:pos]) or not all(full[pos + 1:]):
            return None
    sl = els[pos]
    slots = view.dims[-2]
    if isinstance(sl, cst.Slice):
        upper = sl.upper
        if sl.lower is None and sl.step is None and upper is not None and code(upper) == "-2":
            return "q"
        return None
    idx = sl.value  # type: ignore[attr-defined]
    if isinstance(idx, cst.List) and len(idx.elements) == 1:
        idx = idx.elements[0].value
    text = code(idx)
    if slots == "3" and text in ("0", "1", "2"):
        return "qkv"[int(text)]
    return {"-2": "k", "-1": "v"}.get(text)


def _arm_heads(arm: list[cst.BaseStatement], param: str, head_dim: str) -> str | None:
    """Total query heads of one arm when it returns q, k, v picked from a grouped view of `param`."""
    facts: dict[str, object] = {param: "input"}
    batch_names: set[str] = set()

    def fact(e: cst.BaseExpression) -> object | None:
        if isinstance(e, cst.Name):
            return facts.get(e.value)
        if isinstance(e, cst.Subscript) and isinstance(e.value, cst.Name):
            v = facts.get(e.value.value)
            if isinstance(v, _View) and (slot := _slot(e, v)) is not None:
                return _Pick(v, slot)
            return None
        if isinstance(e, cst.Call) and isinstance(e.func, cst.Attribute):
            base = fact(e.func.value)
            name = e.func.attr.value
            if base == "input" and name == "view":
                args = [code(a.value) for a in e.args]
                lead = 0
                while lead < len(args) and args[lead] in batch_names:
                    lead += 1
                dims = tuple(args[lead:])
                if lead == 2 and len(dims) in (2, 3) and dims[-1] == head_dim:
                    return _View(dims)
                return None
            if isinstance(base, _Pick) and name in _LAYOUT:
                return base
        if isinstance(e, cst.Call) and m.matches(e.func, m.Attribute(value=m.Name("torch"), attr=m.Name("broadcast_to"))):
            return fact(e.args[0].value)
        return None

    for st in arm:
        if isinstance(st, cst.SimpleStatementLine) and len(st.body) == 1:
            small = st.body[0]
            if isinstance(small, cst.Assign) and len(small.targets) == 1:
                target, value = small.targets[0].target, small.value
                if isinstance(target, cst.Tuple) and m.matches(value, m.Attribute(attr=m.Name("shape"))) \
                        and fact(value.value) == "input":  # type: ignore[attr-defined]
                    batch_names |= {el.value.value for el in target.elements if isinstance(el.value, cst.Name)}
                    continue
                if isinstance(target, cst.Name):
                    facts[target.value] = fact(value)
                    continue
                if isinstance(target, cst.Tuple) and isinstance(value, cst.ListComp) \
                        and isinstance(value.for_in.iter, cst.Tuple) and isinstance(value.for_in.target, cst.Name):
                    # `q, k, v = [x.flatten(2, 3) for x in (q, k, v)]`: one layout call per element
                    var = value.for_in.target.value
                    if not (isinstance(value.elt, cst.Call) and isinstance(value.elt.func, cst.Attribute)
                            and m.matches(value.elt.func.value, m.Name(var)) and value.elt.func.attr.value in _LAYOUT):
                        return None
                    srcs = [fact(el.value) for el in value.for_in.iter.elements]
                    for el, src in zip(target.elements, srcs):
                        if not isinstance(el.value, cst.Name):
                            return None
                        facts[el.value.value] = src
                    continue
                return None
            if isinstance(small, cst.Return) and isinstance(small.value, cst.Tuple) and len(small.value.elements) == 3:
                picks = [fact(el.value) for el in small.value.elements]
                if not all(isinstance(p, _Pick) for p in picks):
                    return None
                views = {p.view for p in picks}  # type: ignore[union-attr]
                if len(views) != 1 or [p.slot for p in picks] != ["q", "k", "v"]:  # type: ignore[union-attr]
                    return None
                return _total_heads(views.pop())
        return None
    return None


def _total_heads(view: _View) -> str | None:
    """Query heads of `[groups, slots, head_dim]` (q = slots - 2 per group) or `[slots, head_dim]` (one group)."""
    slots = cst.parse_expression(view.dims[-2])
    groups = view.dims[0] if len(view.dims) == 3 else "1"
    if view.dims[-2] == "3":
        return groups if groups != "-1" else None
    if not (isinstance(slots, cst.BinaryOperation) and isinstance(slots.operator, cst.Add) and code(slots.right) == "2"):
        return None
    per_group = slots.left
    if groups == "1":
        return code(per_group)
    if groups == "-1" and isinstance(per_group, cst.BinaryOperation) and isinstance(per_group.operator, cst.FloorDivide):
        return code(per_group.left)  # `H // KV + 2` slots in -1 groups: KV groups of H // KV
    return None


def grouped_split(info: ClassInfo, attr: str, head_dim: str) -> GroupedSplit | None:
    """`out = self.attr(x); q, k, v = self.helper(out)` where every arm of the helper returns q, k, v
    picked from one grouped view of its input, all arms with the same total query heads."""
    fwd = info.method("forward")
    if fwd is None:
        return None
    outs = {n.targets[0].target.value for n in findall(fwd, m.Assign(  # type: ignore[attr-defined]
        targets=[m.AssignTarget(m.Name())], value=m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(attr)))))}
    for node in findall(fwd, m.Assign(targets=[m.AssignTarget(m.Tuple())], value=m.Call(
            func=m.Attribute(value=m.Name("self"), attr=m.Name()),
            args=[m.Arg(m.Name(m.MatchIfTrue(lambda n: n in outs)))]))):
        helper = node.value.func.attr.value  # type: ignore[attr-defined]
        meth = info.method(helper)
        params = [p.name.value for p in meth.params.params] if meth is not None else []
        if meth is None or len(params) != 2 or not isinstance(meth.body, cst.IndentedBlock):
            continue
        arms = _arms(list(meth.body.body))
        heads = {_arm_heads(arm, params[1], head_dim) for arm in arms or []}
        if arms and len(heads) == 1 and None not in heads:
            return GroupedSplit(helper, heads.pop())  # type: ignore[arg-type]
    return None
