"""A small static interpreter of tensor-layout code, on index arrays.

The layout of a fused projection is what its forward computes from the output, not how the code
spells it. This module runs the statements of a method over sample sizes: the fused output is an
integer array whose every element is its own position (`token * width + row`), and the layout
calls (`view`, `reshape`, `unflatten`, `flatten`, `split`, `chunk`, `unbind`, slicing,
`transpose`, `permute`, `expand`, `broadcast_to`, ...) move those numbers around exactly as torch
would move the values. Whatever reaches q, k and v then says, per head and per element, which
output row feeds it. Nothing is imported or executed: only the listed operations are known, and
anything else is `Unknown` (its targets are forgotten).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import libcst as cst
import numpy as np

from porter.analysis.cstutil import dotted


class Unknown(Exception):
    """An expression the interpreter does not model (a call it does not know, an unbound name)."""


@dataclass
class Opaque:
    """A tensor that does not come from the fused output: only its shape is known."""
    shape: tuple[int, ...]


@dataclass
class Obj:
    """`self` or `config`: attribute reads go through `get`."""
    get: object  # callable(name) -> value


@dataclass
class Frame:
    env: dict[str, object] = field(default_factory=dict)
    returned: object = None
    done: bool = False


_TENSOR_METHODS = frozenset({
    "view", "reshape", "unflatten", "flatten", "split", "chunk", "unbind", "transpose", "permute",
    "contiguous", "expand", "broadcast_to", "squeeze", "unsqueeze", "size", "dim", "t",
})
_TORCH_FUNCS = frozenset({"split", "chunk", "unbind", "transpose", "permute", "broadcast_to",
                          "flatten", "reshape", "squeeze", "unsqueeze"})


def _shape(v) -> tuple[int, ...]:
    if isinstance(v, np.ndarray):
        return tuple(v.shape)
    if isinstance(v, Opaque):
        return v.shape
    raise Unknown("not a tensor")


def _dim(d: int, ndim: int) -> int:
    if not -ndim <= d < ndim:
        raise Unknown("dimension out of range")
    return d % ndim


def _sizes(args: list) -> tuple[int, ...]:
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = list(args[0])
    if not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
        raise Unknown("shape is not integers")
    return tuple(args)


def _reshape(t: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if shape.count(-1) > 1 or any(s < -1 or s == 0 for s in shape):
        raise Unknown("bad shape")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if t.size % known:
            raise Unknown("shape does not divide")
        shape = tuple(t.size // known if s == -1 else s for s in shape)
    if math.prod(shape) != t.size:
        raise Unknown("shape does not match")
    return t.reshape(shape)


def _split(t: np.ndarray, size, dim: int) -> tuple:
    d = _dim(dim, t.ndim)
    n = t.shape[d]
    if isinstance(size, int):
        if size <= 0:
            raise Unknown("bad split size")
        cuts = list(range(size, n, size))
    else:
        sizes = _sizes([size])
        if sum(sizes) != n:
            raise Unknown("split sizes do not add up")
        cuts = list(np.cumsum(sizes)[:-1])
    return tuple(np.split(t, cuts, axis=d))


def tensor_method(t, name: str, args: list, kw: dict):
    """torch.Tensor.NAME(*args, **kw) on an index array (or an Opaque's shape)."""
    if name == "size":
        shape = _shape(t)
        dim = args[0] if args else kw.get("dim")
        return shape if dim is None else shape[_dim(dim, len(shape))]
    if name == "dim":
        return len(_shape(t))
    if not isinstance(t, np.ndarray):
        raise Unknown("layout of a tensor that is not tracked")
    if name in ("view", "reshape"):
        return _reshape(t, _sizes(args))
    if name == "contiguous":
        return t
    if name == "t":
        return t.T
    if name == "transpose":
        a, b = (_dim(x, t.ndim) for x in (args + [kw.get("dim0"), kw.get("dim1")])[:2])
        return np.swapaxes(t, a, b)
    if name == "permute":
        dims = _sizes(args)
        return np.transpose(t, [_dim(d, t.ndim) for d in dims])
    if name == "flatten":
        start = _dim(args[0] if args else kw.get("start_dim", 0), t.ndim)
        end = _dim(args[1] if len(args) > 1 else kw.get("end_dim", -1), t.ndim)
        return t.reshape(t.shape[:start] + (-1,) + t.shape[end + 1:]) if start <= end else t
    if name == "unflatten":
        d = _dim(args[0] if args else kw["dim"], t.ndim)
        sizes = _sizes([args[1] if len(args) > 1 else kw["sizes"]])
        inner = _reshape(np.empty(t.shape[d]), sizes).shape
        return t.reshape(t.shape[:d] + inner + t.shape[d + 1:])
    if name == "split":
        return _split(t, args[0] if args else kw["split_size"], args[1] if len(args) > 1 else kw.get("dim", 0))
    if name == "chunk":
        n, d = args[0], _dim(args[1] if len(args) > 1 else kw.get("dim", 0), t.ndim)
        return _split(t, -(-t.shape[d] // n), d)
    if name == "unbind":
        d = _dim(args[0] if args else kw.get("dim", 0), t.ndim)
        return tuple(np.moveaxis(t, d, 0))
    if name in ("expand", "broadcast_to"):
        sizes = _sizes(args)
        lead = len(sizes) - t.ndim
        full = tuple(t.shape[i - lead] if s == -1 else s for i, s in enumerate(sizes))
        try:
            return np.broadcast_to(t, full)
        except ValueError:
            raise Unknown("cannot broadcast") from None
    if name == "squeeze":
        d = args[0] if args else kw.get("dim")
        return np.squeeze(t) if d is None else (np.squeeze(t, _dim(d, t.ndim)) if t.shape[_dim(d, t.ndim)] == 1 else t)
    if name == "unsqueeze":
        return np.expand_dims(t, _dim(args[0], t.ndim + 1))
    raise Unknown(f"tensor method {name}")


def subscript(v, index: tuple):
    if isinstance(v, tuple):
        if len(index) != 1:
            raise Unknown("tuple subscript")
        return v[index[0]]
    if not isinstance(v, np.ndarray):
        raise Unknown("subscript of an untracked value")
    try:
        return v[index if len(index) != 1 else index[0]]
    except (IndexError, TypeError):
        raise Unknown("bad index") from None


_BINOPS = {
    cst.Add: lambda a, b: a + b, cst.Subtract: lambda a, b: a - b, cst.Multiply: lambda a, b: a * b,
    cst.Modulo: lambda a, b: a % b,
}


def binop(op: cst.BaseBinaryOp, a, b):
    if isinstance(a, tuple) and isinstance(b, tuple) and isinstance(op, cst.Add):
        return a + b
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)):
        raise Unknown("arithmetic on a non-number")
    if isinstance(op, cst.FloorDivide):
        if b == 0 or (isinstance(a, int) and isinstance(b, int) and a % b):
            raise Unknown("inexact division")  # sizes HF divides evenly: a sample that does not is wrong
        return a // b
    if isinstance(op, cst.Divide):
        if b == 0:
            raise Unknown("division by zero")
        return a / b
    fn = _BINOPS.get(type(op))
    if fn is None:
        raise Unknown("operator")
    return fn(a, b)


def compare(op: cst.BaseCompOp, a, b) -> bool:
    if isinstance(op, cst.Is):
        return a is b
    if isinstance(op, cst.IsNot):
        return a is not b
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) or isinstance(a, (Opaque, Obj)) or isinstance(b, (Opaque, Obj)):
        raise Unknown("comparison of tensors")
    table = {cst.Equal: a == b, cst.NotEqual: a != b}
    if type(op) in table:
        return table[type(op)]
    if not all(isinstance(x, (int, float)) for x in (a, b)):
        raise Unknown("ordering of non-numbers")
    ops = {cst.LessThan: a < b, cst.GreaterThan: a > b, cst.LessThanEqual: a <= b, cst.GreaterThanEqual: a >= b}
    if type(op) not in ops:
        raise Unknown("comparison")
    return ops[type(op)]


def torch_function(name: str, args: list, kw: dict):
    """torch.split(t, ...) and friends: the method on the first argument."""
    if name not in _TORCH_FUNCS or not args:
        raise Unknown(f"torch.{name}")
    return tensor_method(args[0], name, args[1:], kw)


def is_torch_call(func: cst.BaseExpression) -> str | None:
    d = dotted(func)
    if d and d.startswith("torch.") and d.count(".") == 1:
        return d.split(".", 1)[1]
    return None


def is_tensor_method(name: str) -> bool:
    return name in _TENSOR_METHODS


def _pattern_axes(side: str) -> list[list[str]] | None:
    """`b q (h gs d)` -> [["b"], ["q"], ["h", "gs", "d"]]; None for what this reader does not
    take (an ellipsis, anonymous or unit axes, nesting)."""
    groups: list[list[str]] = []
    current: list[str] | None = None
    for tok in side.replace("(", " ( ").replace(")", " ) ").split():
        if tok == "(":
            if current is not None:
                return None
            current = []
        elif tok == ")":
            if current is None:
                return None
            groups.append(current)
            current = None
        elif not tok.isidentifier():
            return None
        elif current is not None:
            current.append(tok)
        else:
            groups.append([tok])
    return groups if current is None else None


def einops_rearrange(x, pattern, sizes: dict):
    """einops' `rearrange(x, "left -> right", **sizes)` on an index array: the input's axes split
    into the named ones, permuted, merged as the right side groups them (a reshape and a
    transpose; no axis made or reduced)."""
    if not isinstance(x, np.ndarray) or not isinstance(pattern, str) or pattern.count("->") != 1 \
            or not all(isinstance(v, int) for v in sizes.values()):
        raise Unknown("rearrange")
    left, right = (_pattern_axes(s) for s in pattern.split("->"))
    if left is None or right is None or len(left) != x.ndim:
        raise Unknown("rearrange pattern")
    names = [a for g in left for a in g]
    if sorted(names) != sorted(a for g in right for a in g) or len(set(names)) != len(names):
        raise Unknown("rearrange pattern")
    size = dict(sizes)
    for group, dim in zip(left, x.shape, strict=True):
        unknown = [a for a in group if a not in size]
        known = int(np.prod([size[a] for a in group if a in size]))
        if len(unknown) > 1 or known == 0 or dim % known:
            raise Unknown("rearrange sizes")
        if unknown:
            size[unknown[0]] = dim // known
        elif known != dim:
            raise Unknown("rearrange sizes")
    out = x.reshape([size[a] for a in names]).transpose([names.index(a) for g in right for a in g])
    return out.reshape([int(np.prod([size[a] for a in g])) for g in right])
