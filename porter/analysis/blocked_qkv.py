"""A packed q/k/v projection laid out in blocks: `[blocks, 3, heads / blocks * head_dim]`.

CodeGen's `qkv_proj` was trained sharded over `mp_num` TPU cores: its output is `mp_num` blocks,
each holding one slice of q, of v and of k (in the order forward splits them), each slice the
block's `heads / mp_num` heads:

    qkv = self.qkv_proj(x)
    qkv_split = qkv.reshape(qkv.shape[:-1] + (mp_num, -1))
    query, value, key = torch.split(qkv_split, local_dim, dim=-1)

`blocked_split(info, attr, call)` reads that from forward (the block count a literal, directly or
through a local) and which slot feeds q, k and v of the attention call; None for anything else.
load_weights regroups the checkpoint tensor into [q; k; v] (porter/passes/plumbing/causal_lm_interface.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, dotted, findall
from porter.analysis.index import ClassInfo


@dataclass(frozen=True)
class BlockedSplit:
    blocks: int  # blocks in the projection's output (CodeGen's mp_num)
    slots: tuple[int, int, int]  # the slot of each block holding q, k and v
    reshaped: str  # the local holding the blocked view
    names: tuple[str, ...]  # the split's targets, in slot order


def _assigns(fwd: cst.FunctionDef) -> list[cst.Assign]:
    return [a for a in findall(fwd, m.Assign()) if len(a.targets) == 1]  # type: ignore[attr-defined]


def _ints(info: ClassInfo, fwd: cst.FunctionDef) -> dict[str, int]:
    """Locals of forward and `self.` attributes of `__init__` bound to an integer literal."""
    out: dict[str, int] = {}
    init = info.method("__init__")
    for fn, prefix in ((init, "self."), (fwd, "")):
        for a in _assigns(fn) if fn is not None else []:
            if isinstance(a.value, cst.Integer):
                out.setdefault(f"{prefix}{code(a.targets[0].target)}" if prefix else code(a.targets[0].target),
                               int(a.value.value))
    return {k.replace("self.self.", "self."): v for k, v in out.items()}


def _int(e: cst.BaseExpression, ints: dict[str, int]) -> int | None:
    return int(e.value) if isinstance(e, cst.Integer) else ints.get(code(e))


def _blocks(value: cst.BaseExpression, attr: str, out: str | None, size: cst.BaseExpression,
            ints: dict[str, int], local: dict[str, cst.BaseExpression]) -> int | None:
    """The block count of the view a split reads:
    `out.reshape(out.shape[:-1] + (MP, -1))` (transformers 5.19) -> MP;
    `self.attr(x).view(*shape, -1, 3 * L)` split by L = `E // MP` (5.24) -> MP."""
    if not m.matches(value, m.Call(func=m.Attribute(attr=m.Name("reshape") | m.Name("view")))):
        return None
    base, args = value.func.value, value.args  # type: ignore[attr-defined]
    if out is not None and m.matches(base, m.Name(out)) and len(args) == 1:
        shape = args[0].value
        if isinstance(shape, cst.BinaryOperation) and isinstance(shape.operator, cst.Add) \
                and code(shape.left).replace(" ", "") == f"{out}.shape[:-1]" and isinstance(shape.right, cst.Tuple) \
                and len(shape.right.elements) == 2 and code(shape.right.elements[1].value) == "-1":
            return _int(shape.right.elements[0].value, ints)
    if m.matches(base, m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(attr)))) and len(args) >= 2 \
            and code(args[-2].value) == "-1" and code(args[-1].value).replace(" ", "") == f"3*{code(size)}":
        div = local.get(size.value) if isinstance(size, cst.Name) else None
        if isinstance(div, cst.BinaryOperation) and isinstance(div.operator, cst.FloorDivide):
            return _int(div.right, ints)
    return None


def blocked_split(info: ClassInfo, attr: str, call: cst.Call) -> BlockedSplit | None:
    fwd = info.method("forward")
    if fwd is None:
        return None
    assigns = _assigns(fwd)
    ints = _ints(info, fwd)
    local = {a.targets[0].target.value: a.value for a in assigns if isinstance(a.targets[0].target, cst.Name)}
    out = next((n for n, v in local.items() if m.matches(v, m.Call(
        func=m.Attribute(value=m.Name("self"), attr=m.Name(attr))))), None)
    roles = [code(p) for p in [x.value for x in call.args if x.keyword is None][1:4]]
    for a in assigns:
        # `query, value, key = torch.split(view, local_dim, dim=-1)` or `view.split(local_dim, dim=-1)`
        t, v = a.targets[0].target, a.value
        if not (isinstance(t, cst.Tuple) and len(t.elements) == 3 and isinstance(v, cst.Call) and v.args):
            continue
        if dotted(v.func) == "torch.split" and len(v.args) >= 2 and isinstance(v.args[0].value, cst.Name):
            view, size = v.args[0].value.value, v.args[1].value
        elif m.matches(v.func, m.Attribute(value=m.Name(), attr=m.Name("split"))):
            view, size = v.func.value.value, v.args[0].value  # type: ignore[attr-defined]
        else:
            continue
        names = tuple(code(e.value) for e in t.elements)
        blocks = _blocks(local[view], attr, out, size, ints, local) if view in local else None
        if blocks is None or sorted(roles) != sorted(names):
            continue
        return BlockedSplit(blocks, tuple(names.index(r) for r in roles), view, names)  # type: ignore[arg-type]
    return None
