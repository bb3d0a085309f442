"""What a latent attention computes beyond what the engine's MLA layer builds
(porter/analysis/latent_attention.py): the engine's `MultiHeadLatentAttentionWrapper` runs the
query, the KV latent and its norm, the up-projection, rope, the attention and the output projection,
and nothing between them. Anything else the class holds and its forward uses is named here, so the
port is refused rather than built without it (DeepSeek-V3.2-style sparse attention through an
indexer, a per-head output gate, attention sinks, a rescaled latent)."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, dotted, findall, self_attr
from porter.analysis.index import ClassInfo
from porter.analysis.latent_attention import LatentAttention

SPARSE = ("whose output selects the keys each query attends to: sparse attention, which the engine's "
          "CPU backend does not run, 'Sparse Attention is not supported on CPU'")


def latent_extras(info: ClassInfo, la: LatentAttention, around: set[str] | None = None) -> list[str]:
    """One phrase per module, parameter or scale of the class that forward uses and the engine's
    MLA layer has no place for (empty: the layer computes all of it); AROUND: the attributes of what
    the decompressed port computes around the projections (porter/analysis/latent_around.py)."""
    return extras_beyond(info, {la.kv_a, la.kv_norm, la.kv_b, la.o, la.q, la.q_a, la.q_norm, la.q_b, *(around or ())})


def extras_beyond(info: ClassInfo, roles: set[str | None]) -> list[str]:
    """The phrases of `latent_extras` for the attributes outside ROLES (those the MLA layer builds)."""
    init = info.method("__init__")
    if init is None:
        return []
    held: dict[str, cst.BaseExpression] = {}
    for node in findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))])):
        assert isinstance(node, cst.Assign)
        attr = self_attr(node.targets[0].target)
        if attr is not None:
            held[attr] = node.value
    fns = [f for f in findall(info.node, m.FunctionDef()) if f is not init]
    sparse = _feeding_indices(fns)
    out: list[str] = []
    for attr in sorted({a for f in fns for n in findall(f, m.Attribute(value=m.Name("self")))
                        if (a := self_attr(n)) in held and a not in roles}):  # type: ignore[arg-type]
        value = held[attr]
        built = [c for c in findall(value, m.Call()) if dotted(c.func)]  # type: ignore[attr-defined]
        if any((dotted(c.func) or "").split(".")[-1] in ("Linear", "Parameter", "Buffer")  # type: ignore[attr-defined]
               or (dotted(c.func) or "")[:1].isupper() for c in built):  # type: ignore[attr-defined]
            what = "parameter" if any((dotted(c.func) or "").endswith(("Parameter", "Buffer")) for c in built) else "module"  # type: ignore[attr-defined]
            out.append(f"{what} self.{attr}" + (f" {SPARSE}" if attr in sparse else ""))
    for f in fns:
        for b in findall(f, m.BinaryOperation(operator=m.Multiply() | m.Divide())):
            assert isinstance(b, cst.BinaryOperation)
            attrs = [self_attr(x) for x in (b.left, b.right)]
            if any(a is not None and a not in roles for a in attrs) and None in attrs \
                    and not any(isinstance(x, (cst.Integer, cst.Float)) for x in (b.left, b.right)):
                out.append(f"the scale `{code(b)}`")
    return list(dict.fromkeys(out))


def _feeding_indices(fns: list[cst.FunctionDef]) -> set[str]:
    """The modules whose output reaches an `indices=` argument (through plain assignments)."""
    found: set[str] = set()
    for f in fns:
        origin: dict[str, set[str]] = {}
        for node in findall(f, m.Assign(targets=[m.AssignTarget(m.Name())])):
            assert isinstance(node, cst.Assign)
            name = node.targets[0].target.value  # type: ignore[attr-defined]
            src = {a for c in findall(node.value, m.Call(func=m.Attribute(value=m.Name("self"))))
                   if (a := self_attr(c.func)) is not None}  # type: ignore[attr-defined]
            src |= {o for n in findall(node.value, m.Name()) for o in origin.get(n.value, ())}  # type: ignore[attr-defined]
            origin[name] = origin.get(name, set()) | src
        for arg in findall(f, m.Arg(keyword=m.Name("indices"))):
            found |= {o for n in findall(arg.value, m.Name()) for o in origin.get(n.value, ())}  # type: ignore[attr-defined]
    return found
