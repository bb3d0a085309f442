"""What a latent attention (porter/analysis/latent_attention.py) computes around its projections,
read from forward's dataflow, for the port that computes it over the decompressed keys and values
(PT281), where each step is ordinary tensor code the port can keep:

- a per-head output gate: a projection of the hidden states to one value per head whose sigmoid
  multiplies the attention output head by head (dots3_note's `g_proj`);
- a rescaled latent: the normed query latent or the normed KV latent multiplied by a scale the
  class holds (`q_resid * self.q_lora_scale`);
- a norm over the shared rope key, applied before the rotary (`k_rope_only_layernorm`);
- a sparse-attention indexer: a module whose output reaches the attention call's `indices=` (or the
  mask it builds), choosing the top `index_topk` keys of each query. While a sequence holds no more
  keys than that, the top-k is every key and the selection changes nothing; the port keeps no
  indexer and refuses at load an engine whose max_model_len is above the bound
  (porter/passes/attention/latent_indexer_guard.py).

Anything else the class uses stays an extra that refuses the port (porter/analysis/latent_extras.py)."""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, findall, self_attr
from porter.analysis.index import ClassInfo, ModelIndex
from porter.analysis.latent_attention import LatentAttention, _shapes


@dataclass(frozen=True)
class LatentAround:
    gate: str | None = None  # hidden -> heads projection; attention output * sigmoid(gate) per head
    q_scale: str | None = None  # the scale the normed query latent is multiplied by (`self.q_lora_scale`)
    kv_scale: str | None = None  # ... the normed KV latent
    k_rope_norm: str | None = None  # a norm over the shared rope key, before the rotary
    indexer: str | None = None  # the sparse-attention indexer's attribute
    indexer_cls: str | None = None  # ... its class (not ported)
    index_topk: str | None = None  # the bound within which its top-k is every key (`config.index_topk`)

    def roles(self) -> set[str]:
        return {a for a in (self.gate, self.k_rope_norm, self.indexer) if a} | \
            {s.split(".", 1)[1] for s in (self.q_scale, self.kv_scale) if s and s.startswith("self.")}


def _flow(fwd: cst.FunctionDef):
    """(assignment, local name -> the self modules whose output reaches it just before it), in
    source order; an assignment replaces what its targets held (tuple targets: each gets all)."""
    origin: dict[str, set[str]] = {}
    for node in findall(fwd, m.Assign()):
        assert isinstance(node, cst.Assign)
        yield node, origin
        src = {a for c in findall(node.value, m.Call(func=m.Attribute(value=m.Name("self"))))
               if (a := self_attr(c.func)) is not None}  # type: ignore[attr-defined]
        src |= {o for n in findall(node.value, m.Name()) for o in origin.get(n.value, ())}  # type: ignore[attr-defined]
        origin = dict(origin)
        for t in node.targets:
            for name in findall(t.target, m.Name()):
                origin[name.value] = set(src)  # type: ignore[attr-defined]


def _sigmoid_of(node: cst.BaseExpression) -> str | None:
    """X of `X.sigmoid()` / `torch.sigmoid(X)` when X is a name."""
    if m.matches(node, m.Call(func=m.Attribute(value=m.Name(), attr=m.Name("sigmoid")), args=[])):
        return node.func.value.value  # type: ignore[attr-defined]
    if m.matches(node, m.Call(func=m.Attribute(value=m.Name("torch"), attr=m.Name("sigmoid")), args=[m.Arg(m.Name())])):
        return node.args[0].value.value  # type: ignore[attr-defined]
    return None


def _topk_bound(idx: ModelIndex, cls: str, built_with: str) -> str | None:
    """The config attribute bounding the indexer's top-k: `topk = min(self.index_topk, n)`, then
    `x.topk(topk, ...)`, with `self.index_topk = config.index_topk` in `__init__` (CONFIG the name its
    `__init__` takes the config by), as BUILT_WITH's attribute (the expression the attention hands it)."""
    info = idx.classes.get(cls)
    if info is None or (init := info.method("__init__")) is None or (fwd := info.method("forward")) is None:
        return None
    params = [p.name.value for p in init.params.params[1:]]
    aliases = {f"self.{self_attr(t)}": code(n.value)  # (`self.x = config.y`, or `self.x: int = config.y`)
               for n in findall(init, m.Assign() | m.AnnAssign())
               for t in ([x.target for x in n.targets] if isinstance(n, cst.Assign) else [n.target])  # type: ignore[attr-defined]
               if self_attr(t) and m.matches(n.value, m.Attribute(value=m.Name()))}  # type: ignore[attr-defined]
    bound = {n.targets[0].target.value: n.value  # type: ignore[attr-defined]
             for n in findall(fwd, m.Assign(targets=[m.AssignTarget(m.Name())]))}
    for call in findall(fwd, m.Call(func=m.Attribute(attr=m.Name("topk")))):
        k = call.args[0].value if call.args else None  # type: ignore[attr-defined]
        if isinstance(k, cst.Name) and k.value in bound:
            k = bound[k.value]
        if m.matches(k, m.Call(func=m.Name("min"))):
            for a in k.args:  # type: ignore[attr-defined]
                text = aliases.get(code(a.value), "")
                if params and text.startswith(f"{params[0]}."):
                    return f"{built_with}.{text.split('.', 1)[1]}"
    return None


def latent_around(idx: ModelIndex, info: ClassInfo, la: LatentAttention) -> LatentAround:
    """What forward computes around LA's projections that the decompressed port keeps (see above)."""
    if (shapes := _shapes(idx, info)) is None:
        return LatentAround()
    fwd, aliases, sized, norms = shapes
    gate = q_scale = kv_scale = k_rope_norm = None
    rope = aliases.get(la.rope_dim, la.rope_dim)
    heads = aliases.get(la.heads, la.heads)
    sparse: set[str] = set()
    for node, origin in _flow(fwd):
        for b in findall(node.value, m.BinaryOperation(operator=m.Multiply())):
            assert isinstance(b, cst.BinaryOperation)
            for one, other in ((b.left, b.right), (b.right, b.left)):
                name = _sigmoid_of(one)
                if name and isinstance(other, cst.Name) and (src := origin.get(name, set())) and len(src) == 1 \
                        and sized.get(next(iter(src))) == [la.hidden, heads]:
                    gate = next(iter(src))
                scale = self_attr(one)
                if scale and isinstance(other, cst.Name) and scale not in sized and scale not in norms:
                    src = origin.get(other.value, set())
                    if src == {la.q_a, la.q_norm}:
                        q_scale = f"self.{scale}"
                    elif src == {la.kv_a, la.kv_norm}:
                        kv_scale = f"self.{scale}"
        if m.matches(node.value, m.Call(func=m.Attribute(value=m.Name("self")), args=[m.Arg(m.Name())])):
            attr = self_attr(node.value.func)  # type: ignore[attr-defined]
            arg = node.value.args[0].value.value  # type: ignore[attr-defined]
            if attr in norms and norms[attr] == rope and origin.get(arg) == {la.kv_a}:
                k_rope_norm = attr
        for arg in findall(node.value, m.Arg(keyword=m.Name("indices"))):
            sparse |= {o for n in findall(arg.value, m.Name()) for o in origin.get(n.value, ())}  # type: ignore[attr-defined]
    indexer = indexer_cls = topk = None
    init = info.method("__init__")
    for node in findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))])) if init else []:
        attr = self_attr(node.targets[0].target)  # type: ignore[attr-defined]
        value = node.value  # type: ignore[attr-defined]
        call = value.body if isinstance(value, cst.IfExp) else value
        if attr in sparse and isinstance(call, cst.Call) and isinstance(call.func, cst.Name) \
                and call.func.value in idx.classes and call.args:
            indexer, indexer_cls = attr, call.func.value
            topk = _topk_bound(idx, indexer_cls, code(call.args[0].value))
    return LatentAround(gate=gate, q_scale=q_scale, kv_scale=kv_scale, k_rope_norm=k_rope_norm,
                        indexer=indexer if topk else None, indexer_cls=indexer_cls if topk else None,
                        index_topk=topk)
