"""Multi-head latent attention (MLA, the DeepSeek-V2 family), recognised by its dataflow and the
shapes `__init__` builds, not by attribute names:

- a latent projection A: hidden -> P + R, whose output forward splits into [P, R];
- a norm N built over P (the compressed KV latent), and an up-projection B: P -> heads * (nope + v)
  whose output is split into the keys' no-rope part and the values;
- a query, either one projection of the hidden states or a low-rank pair (hidden -> L, a norm over
  L, L -> heads * (nope + rope)), split into [nope, rope];
- an output projection of heads * v back to the hidden size.

The engine builds exactly this as `MultiHeadLatentAttentionWrapper` with its `MLAModules`
(porter/passes/attention/latent_attention.py)."""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, dotted, findall, self_attr
from porter.analysis.index import LINEAR_NAMES, ClassInfo, ModelIndex


@dataclass(frozen=True)
class LatentAttention:
    cls: str
    kv_a: str  # hidden -> kv_lora_rank + rope dims (checkpoint: kv_a_proj_with_mqa)
    kv_norm: str
    kv_b: str  # kv_lora_rank -> heads * (nope + v)
    o: str
    q: str | None  # one query projection (None: only the low-rank pair)
    q_a: str | None
    q_norm: str | None
    q_b: str | None
    q_lora: str | None  # the attribute holding the low rank (`self.q_lora_rank`), when there is a pair
    q_lora_config: str | None  # ... and the config attribute it is read from (`config.q_lora_rank`)
    kv_lora: str  # expressions of forward's splits (`self.kv_lora_rank`, ...)
    rope_dim: str
    nope_dim: str
    v_dim: str
    heads: str
    hidden: str
    neox: str  # "True" | "False" | a config test (`not self.config.rope_interleave`)
    line: int


def _built(value: cst.BaseExpression) -> cst.Call | None:
    """The module call a `self.x = ...` binds (either arm of `None if c else Linear(...)`)."""
    if isinstance(value, cst.IfExp):
        arms = [a for a in (value.body, value.orelse) if isinstance(a, cst.Call)]
        return arms[0] if len(arms) == 1 else None
    return value if isinstance(value, cst.Call) else None


def _args(call: cst.Call) -> list[str]:
    return [code(a.value) for a in call.args if a.keyword is None]


def _norm(text: str, aliases: dict[str, str]) -> str:
    """`self.kv_lora_rank` and `config.kv_lora_rank` are one size when `__init__` binds one to the other."""
    return aliases.get(text, text)


def _split_sizes(fwd: cst.CSTNode, source: cst.BaseExpression | str) -> list[str] | None:
    """[a, b] of `torch.split(X, [a, b], dim=-1)` / `X.split([a, b], dim=-1)` where X is SOURCE (a
    local name, or the call itself)."""
    src = source if isinstance(source, str) else code(source)
    for call in findall(fwd, m.Call()):
        assert isinstance(call, cst.Call)
        pos = [a.value for a in call.args if a.keyword is None]
        if dotted(call.func) == "torch.split" and len(pos) >= 2:
            target, sizes = pos[0], pos[1]
        elif isinstance(call.func, cst.Attribute) and call.func.attr.value == "split" and pos:
            target, sizes = call.func.value, pos[0]
        else:
            continue
        if code(target) == src and isinstance(sizes, cst.List) and len(sizes.elements) == 2:
            return [code(e.value) for e in sizes.elements]
    return None


def _output_of(fns: list[cst.FunctionDef], attr: str) -> tuple[cst.FunctionDef, str] | None:
    """(function, local name) of the first `name = self.ATTR(...)...` in FNS (through method chains
    such as `.view(...).transpose(1, 2)`)."""
    for fn in fns:
        for node in findall(fn, m.Assign(targets=[m.AssignTarget(m.Name())])):
            assert isinstance(node, cst.Assign)
            if any(m.matches(c, m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(attr))))
                   for c in findall(node.value, m.Call())):
                return fn, node.targets[0].target.value  # type: ignore[attr-defined]
    return None


def _rope_style(idx: ModelIndex, fwd: cst.FunctionDef) -> str:
    """How the rotary helper forward calls pairs the rope dims: neox halves (`rotate_half`) or
    interleaved pairs (`x[..., 0::2]`, or complex numbers); an `if` on a config flag choosing
    between the two gives that test."""
    def interleaved(call: cst.Call) -> bool | None:
        fn = idx.functions.get(dotted(call.func) or "")
        if fn is None:
            return None
        text = code(fn)
        return "0::2" in text or "view_as_complex" in text

    for node in findall(fwd, m.If()):
        assert isinstance(node, cst.If)
        if not isinstance(node.orelse, cst.Else):
            continue
        arms = [next((interleaved(c) for c in findall(b, m.Call()) if interleaved(c) is not None), None)
                for b in (node.body, node.orelse.body)]
        if arms == [True, False]:
            return f"not {code(node.test)}"
        if arms == [False, True]:
            return code(node.test)
    for call in findall(fwd, m.Call()):
        found = interleaved(call)  # type: ignore[arg-type]
        if found is not None:
            return "False" if found else "True"
    return "True"


def _shapes(idx: ModelIndex, info: ClassInfo):
    """The linears (attr -> [in, out] sizes, aliases resolved) and norms (attr -> size) `__init__`
    builds, or None without `__init__`/`forward`."""
    init, fwd = info.method("__init__"), info.method("forward")
    if init is None or fwd is None:
        return None
    built: dict[str, cst.Call] = {}
    aliases: dict[str, str] = {}
    for node in findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))])):
        assert isinstance(node, cst.Assign)
        attr = self_attr(node.targets[0].target)
        if attr is None:
            continue
        if (call := _built(node.value)) is not None and dotted(call.func):
            built[attr] = call
        elif m.matches(node.value, m.Attribute() | m.Name()):
            aliases[f"self.{attr}"] = code(node.value)
    linears = {a: c for a, c in built.items() if idx.qualify(dotted(c.func)) in LINEAR_NAMES and len(_args(c)) >= 2}
    sized = {a: [_norm(x, aliases) for x in _args(c)] for a, c in linears.items()}
    norms = {a: _norm(_args(c)[0], aliases) for a, c in built.items()
             if a not in linears and dotted(c.func) in idx.classes and _args(c)}
    return fwd, aliases, sized, norms


def _latent_kv(sized: dict[str, list[str]], norms: dict[str, str], aliases: dict[str, str]):
    """(kv_a, kv_norm, kv_b, hidden) of the KV side: A: hidden -> P + R, a norm over P, B: P -> ..."""
    for kv_a, (hidden, out) in ((a, s[:2]) for a, s in sized.items()):
        sum_ = cst.parse_expression(out)
        if not (isinstance(sum_, cst.BinaryOperation) and isinstance(sum_.operator, cst.Add)):
            continue
        latent = _norm(code(sum_.left), aliases)
        kv_norm = next((n for n, w in norms.items() if w == latent), None)
        kv_b = next((a for a, s in sized.items() if a != kv_a and s[0] == latent), None)
        if kv_norm is not None and kv_b is not None:
            return kv_a, kv_norm, kv_b, hidden
    return None


def latent_attention(idx: ModelIndex, info: ClassInfo) -> LatentAttention | None:
    if (shapes := _shapes(idx, info)) is None:
        return None
    fwd, aliases, sized, norms = shapes
    if (kv := _latent_kv(sized, norms, aliases)) is None:
        return None
    kv_a, kv_norm, kv_b, hidden = kv
    return _complete(idx, info, fwd, kv_a, kv_norm, kv_b, hidden, sized, norms)


def latent_kv_roles(idx: ModelIndex, info: ClassInfo) -> set[str] | None:
    """The attributes of a class whose KV side is latent attention's (the latent projection, its norm,
    the up-projection) but whose query or output the engine's MLA layer does not build as they are:
    those three, the output projection (heads * v -> hidden) and a low-rank query's first half
    (hidden -> L with a norm over L). None: no latent KV side."""
    if (shapes := _shapes(idx, info)) is None:
        return None
    _fwd, aliases, sized, norms = shapes
    if (kv := _latent_kv(sized, norms, aliases)) is None:
        return None
    kv_a, kv_norm, kv_b, hidden = kv
    roles = {kv_a, kv_norm, kv_b}
    roles |= {a for a, s in sized.items() if a not in roles and s[1] == hidden}
    for a, s in sized.items():
        if a not in roles and s[0] == hidden and (norm := next((n for n, w in norms.items() if w == s[1]), None)):
            roles |= {a, norm}
    return roles


def _complete(idx, info, fwd, kv_a, kv_norm, kv_b, hidden, sized, norms) -> LatentAttention | None:
    methods = [fwd, *(f for f in findall(info.node, m.FunctionDef()) if f is not fwd)]
    found = _output_of([fwd], kv_a)
    kv_sizes = _split_sizes(fwd, found[1]) if found else None
    up = _output_of(methods, kv_b)  # (in a helper method too: HF's `expand_kv`)
    v_sizes = _split_sizes(up[0], up[1]) if up else None
    o = next((a for a, s in sized.items() if a not in (kv_a, kv_b) and s[1] == hidden), None)
    rest = {a: s for a, s in sized.items() if a not in (kv_a, kv_b, o)}
    q = q_a = q_b = q_norm = None
    singles = []
    for a, s in rest.items():
        if s[0] != hidden:
            continue
        pair = next((b for b, t in rest.items() if t[0] == s[1]), None)
        norm = next((n for n, w in norms.items() if w == s[1]), None)
        if pair is not None and norm is not None:
            q_a, q_b, q_norm = a, pair, norm
        else:
            singles.append(a)
    # the query: the one projection of the hidden states whose output forward splits [nope, rope]
    split = [a for a in singles if (out := _output_of([fwd], a)) and _split_sizes(fwd, out[1])]
    q = split[0] if len(split) == 1 else None
    query = _output_of([fwd], q_b or q or "")
    q_sizes = _split_sizes(fwd, query[1]) if query else None
    if None in (kv_sizes, v_sizes, q_sizes, o) or (q is None and q_a is None):
        return None
    heads_of = cst.parse_expression(sized[o][0])  # `self.num_heads * self.v_head_dim`
    if not isinstance(heads_of, cst.BinaryOperation):
        return None
    v_dim = v_sizes[1]  # type: ignore[index]
    heads = code(heads_of.left) if code(heads_of.right) == v_dim else code(heads_of.right)
    q_lora = next((k for k, v in _aliases_of(info).items() if q_a and v == sized[q_a][1]), None) if q_a else None
    if q_a and q_lora is None:
        q_lora = sized[q_a][1]
    return LatentAttention(
        cls=info.name, kv_a=kv_a, kv_norm=kv_norm, kv_b=kv_b, o=o, q=q, q_a=q_a, q_norm=q_norm, q_b=q_b,  # type: ignore[arg-type]
        q_lora=q_lora, q_lora_config=_aliases_of(info).get(q_lora or "", q_lora), kv_lora=kv_sizes[0], rope_dim=kv_sizes[1], nope_dim=q_sizes[0], v_dim=v_dim,  # type: ignore[index]
        heads=heads, hidden=hidden, neox=_rope_style(idx, fwd), line=info.line)


def _aliases_of(info: ClassInfo) -> dict[str, str]:
    init = info.method("__init__")
    out: dict[str, str] = {}
    for node in findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))])) if init else []:
        assert isinstance(node, cst.Assign)
        if m.matches(node.value, m.Attribute() | m.Name()):
            out[f"self.{self_attr(node.targets[0].target)}"] = code(node.value)
    return out
