"""Which output rows of one fused q/k/v projection feed which head of q, k and v: read from what
the attention's forward computes, not from how it is spelled.

The forward (and the methods it calls with the fused output) is interpreted on index arrays
(porter/analysis/layout_interp.py) once per *world*: each combination of the config flags its
code branches on, with sample sizes for the config's integers. Whatever reaches the query, key and
value arguments of the attention call is a map (head, element) -> output row. A layout is a claim
about that map in every world:

    grouped:  per KV head g, its H / KV query heads, then one k and one v head:
              [KV, H / KV + 2, head_dim] (Falcon's three config layouts: H groups of one query
              head = interleaved per head; one group = multi-query)

The sample sizes come in two different chains (each size a multiple of the sizes read after it,
so that `hidden // heads` and `heads // kv_heads` divide); a layout holds only if both agree.
`fused_layout` also says which top-level statements of forward compute the split (they go when
the rewrite splits the engine's `[q; k; v]` output by sizes) and which methods they call.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import libcst as cst
import libcst.matchers as m
import numpy as np

from porter.analysis.cstutil import code, findall, param_names
from porter.analysis.index import ClassInfo
from porter.analysis.layout_interp import Interp
from porter.analysis.symeval import Frame, Opaque, Unknown

BATCH, SEQ = 2, 3  # sample batch and sequence sizes of the fused output
MAX_FLAGS = 5
CHAINS = ((2, 3, 2, 2, 3, 2, 2, 3), (3, 2, 2, 3, 2, 2, 3, 2))  # factors from the last size read up


@dataclass(frozen=True)
class FusedLayout:
    kind: str  # "grouped" or "flat"
    num_heads: str  # the `self.` attribute holding the total query heads in every world
    helpers: tuple[str, ...]  # methods of the class the split runs (they go with it)
    first: int  # forward's top-level statement binding the projection's output
    last: int  # the statement after which q, k and v are split
    chain: tuple[int, ...]  # top-level statements from first to last that compute the split
    out_name: str | None  # the name `first` binds
    names: tuple[str, str, str]  # the q, k, v names `last` binds


@dataclass
class _World:
    rows: tuple[np.ndarray, np.ndarray, np.ndarray]  # q (H, D), k (KV, D), v (KV, D)
    width: int
    attrs: dict[str, object]
    trace: list[dict]
    called: tuple[str, ...]
    ints: dict[str, int]  # the config's sizes in this world


class _Config:
    def __init__(self, flags: dict[str, bool], ints: dict[str, int], chain: list[int]) -> None:
        self.flags, self.ints, self.chain, self.order = flags, ints, chain, []

    def get(self, name: str):
        if name in self.flags:
            return self.flags[name]
        if name not in self.ints:
            if len(self.ints) >= len(self.chain):
                raise Unknown("too many sizes")
            self.ints[name] = self.chain[len(self.ints)]
            self.order.append(name)
        return self.ints[name]


def _chain(factors: tuple[int, ...]) -> list[int]:
    out = [factors[-1]]
    for f in reversed(factors[:-1]):
        out.append(out[-1] * f)
    return out[::-1]


def _flags(info: ClassInfo, fns: list[cst.FunctionDef]) -> list[str]:
    """Config attributes the code branches on: `config.X` / `self.config.X` in a test, or `self.Y`
    in a test where `__init__` has `self.Y = config.X`."""
    init = info.method("__init__")
    alias = {}
    for a in findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))],
                                    value=m.Attribute(value=m.Name("config")))) if init else []:
        alias[a.targets[0].target.attr.value] = a.value.attr.value  # type: ignore[attr-defined]
    tests: list[cst.BaseExpression] = []
    for fn in fns:
        tests += [n.test for n in findall(fn, m.If() | m.IfExp())]  # type: ignore[attr-defined]
    out: list[str] = []
    while tests:
        t = tests.pop(0)
        if isinstance(t, cst.BooleanOperation):
            tests += [t.left, t.right]
            continue
        if isinstance(t, cst.UnaryOperation) and isinstance(t.operator, cst.Not):
            tests.append(t.expression)
            continue
        name = None
        if m.matches(t, m.Attribute(value=m.Name("config") | m.Attribute(value=m.Name("self"), attr=m.Name("config")))):
            name = t.attr.value  # type: ignore[attr-defined]
        elif m.matches(t, m.Attribute(value=m.Name("self"))) and t.attr.value in alias:  # type: ignore[attr-defined]
            name = alias[t.attr.value]  # type: ignore[attr-defined]
        if name and name not in out:
            out.append(name)
    return out


def _rows(t, width: int, head_dim: int) -> np.ndarray:
    """(heads, head_dim) output rows of a q, k or v index array laid out [b, s, h, d], [b, h, s, d]
    or [b, s, h * d]; each element must read its own token."""
    if not isinstance(t, np.ndarray):
        raise Unknown("not derived from the fused output")
    if t.ndim == 3:
        if t.shape[:2] != (BATCH, SEQ) or t.shape[2] % head_dim:
            raise Unknown("flat shape")
        t = t.reshape(BATCH, SEQ, -1, head_dim)
    if t.ndim != 4 or t.shape[-1] != head_dim:
        raise Unknown("head shape")
    token = np.arange(BATCH * SEQ).reshape(BATCH, SEQ, 1, 1)
    for perm in ((0, 1, 2, 3), (0, 2, 1, 3)):
        c = np.transpose(t, perm)
        if c.shape[:2] == (BATCH, SEQ) and np.array_equal(c // width, np.broadcast_to(token, c.shape)):
            rows = c[0, 0] % width
            if all(np.array_equal(c[b, s] % width, rows) for b in range(BATCH) for s in range(SEQ)):
                return rows
    raise Unknown("q/k/v do not read their own token's rows")


def _distinct_heads(rows: np.ndarray, heads: int) -> np.ndarray | None:
    """KV heads repeated to H (broadcast for GQA) -> the distinct ones, if the repeat is GQA's."""
    uniq = [rows[0]]
    for r in rows[1:]:
        if not np.array_equal(r, uniq[-1]):
            uniq.append(r)
    kv = len(uniq)
    if kv == rows.shape[0]:
        return rows
    if heads % kv or rows.shape[0] != heads:
        return None
    rep = np.repeat(np.stack(uniq), heads // kv, axis=0)
    return np.stack(uniq) if np.array_equal(rep, rows) else None


def _grouped(w: _World, d: int) -> tuple[bool, bool]:
    """(is grouped, is also flat [q; k; v])."""
    q, k, v = w.rows
    h, kv = q.shape[0], k.shape[0]
    if kv != v.shape[0] or h % kv or w.width != (h + 2 * kv) * d:
        return False, False
    g = h // kv
    ar = np.arange(d)
    want_q = np.stack([((i // g) * (g + 2) + i % g) * d + ar for i in range(h)])
    want_k = np.stack([(j * (g + 2) + g) * d + ar for j in range(kv)])
    want_v = want_k + d
    grouped = np.array_equal(q, want_q) and np.array_equal(k, want_k) and np.array_equal(v, want_v)
    flat = np.array_equal(q.reshape(-1), np.arange(h * d)) and np.array_equal(
        np.concatenate([k.reshape(-1), v.reshape(-1)]), np.arange(h * d, (h + 2 * kv) * d))
    return grouped, flat


class _Run:
    """One world of one class: init, then forward."""

    def __init__(self, info: ClassInfo, attr: str, config: _Config) -> None:
        self.info, self.attr, self.config = info, attr, config
        self.attrs: dict[str, object] = {}
        methods = {st.name.value: st for st in info.node.body.body
                   if isinstance(st, cst.FunctionDef) and st.name.value not in ("__init__", "forward")}
        self.fused_value: np.ndarray | None = None
        self.interp = Interp(self._self_get, self._fused, methods)

    def _self_get(self, name: str):
        if name == "config":
            from porter.analysis.symeval import Obj

            return Obj(self.config.get)
        v = self.attrs.get(name, Unknown())
        if isinstance(v, Unknown):
            raise Unknown(f"self.{name}")
        return v

    def _fused(self, name: str):
        if name != self.attr or self.fused_value is None:
            return None
        return self.fused_value.copy()

    def init(self) -> dict:
        init = self.info.method("__init__")
        if init is None:
            raise Unknown("no __init__")
        params = param_names(init)
        frame = Frame({params[1]: self.interp.expr(cst.parse_expression("self.config"), {})} if len(params) > 1 else {})

        def set_attr(name: str, value) -> None:
            self.attrs[name] = value

        self.interp.set_self_attr = set_attr
        self.interp.block(init.body.body, frame)  # type: ignore[attr-defined]
        self.interp.set_self_attr = None
        return frame.env

    def forward(self, in_features: int, width: int) -> tuple[Frame, list[dict]]:
        fwd = self.info.method("forward")
        params = param_names(fwd)  # type: ignore[arg-type]
        self.fused_value = np.arange(BATCH * SEQ * width).reshape(BATCH, SEQ, width)
        frame = Frame({params[1]: Opaque((BATCH, SEQ, in_features))} if len(params) > 1 else {})
        trace: list[dict] = []
        self.interp.block(fwd.body.body, frame, trace)  # type: ignore[union-attr]
        return frame, trace


def _world(info: ClassInfo, attr: str, names: list[str], head_dim: str, linear: tuple[str, str],
           config: _Config) -> _World:
    run = _Run(info, attr, config)
    init_env = run.init()
    env = {**init_env}
    in_f, out_f = (run.interp.expr(cst.parse_expression(t), env) for t in linear)
    d = run.interp.expr(cst.parse_expression(head_dim), {})
    if not all(isinstance(x, int) and x > 0 for x in (in_f, out_f, d)):
        raise Unknown("sizes")
    frame, trace = run.forward(in_f, out_f)
    last: dict[str, np.ndarray] = {}
    for snap in trace:
        last.update({k: v for k, v in snap.items() if isinstance(v, np.ndarray)})
    q, k, v = (_rows(last.get(n), out_f, d) for n in names)
    heads = q.shape[0]
    k, v = _distinct_heads(k, heads), _distinct_heads(v, heads)
    if k is None or v is None:
        raise Unknown("k/v heads are not grouped as GQA repeats them")
    return _World((q, k, v), out_f, dict(run.attrs), trace, tuple(dict.fromkeys(run.interp.called)),
                  dict(config.ints))


def _worlds(info: ClassInfo, attr: str, names: list[str], head_dim: str, linear: tuple[str, str],
            factors: tuple[int, ...]) -> list[_World] | None:
    fns = [f for f in (info.method("forward"), *(st for st in info.node.body.body if isinstance(st, cst.FunctionDef)))
           if f is not None]
    flags = _flags(info, fns)
    if len(flags) > MAX_FLAGS:
        return None
    chain = _chain(factors)
    order: list[str] = []  # the sizes the code reads, in the order it reads them (every world)
    for bits in itertools.product((False, True), repeat=len(flags)):
        probe = _Config(dict(zip(flags, bits)), dict(zip(order, chain)), chain)
        try:
            _world(info, attr, names, head_dim, linear, probe)
        except Unknown:
            pass
        order += probe.order
    for perm in itertools.islice(itertools.permutations(range(len(order))), 120):
        ints = {order[p]: chain[i] for i, p in enumerate(perm)}
        out = []
        for bits in itertools.product((False, True), repeat=len(flags)):
            try:
                out.append(_world(info, attr, names, head_dim, linear, _Config(dict(zip(flags, bits)), dict(ints), chain)))
            except Unknown:
                break
        else:
            return out
    return None


def _heads_attr(info: ClassInfo, worlds: list[_World]) -> str | None:
    """The `self.` attribute equal to the query heads in every world (init order)."""
    from porter.analysis.layouts import init_attrs

    for name in init_attrs(info):
        if all(w.attrs.get(name) == w.rows[0].shape[0] and not isinstance(w.attrs.get(name), bool) for w in worlds):
            return f"self.{name}"
    # else the config's own size, read through the config the attention holds (ergo)
    for name in worlds[0].ints:
        if all("config" in w.attrs and w.ints.get(name) == w.rows[0].shape[0] for w in worlds):
            return f"self.config.{name}"
    return None


def _region(worlds: list[_World]) -> tuple[int, int, tuple[int, ...], tuple[str, str, str]] | None:
    """(first, last, chain, names): the same in every world, else None."""
    found = set()
    for w in worlds:
        width = w.width
        sets = [frozenset(np.unique(r).tolist()) for r in w.rows]
        first = last = None
        names: tuple[str, ...] = ()
        chain = []
        prev: dict = {}
        picks: list[str | None] = [None, None, None]  # q, k, v may be bound one statement each (GPT-NeoX-Japanese)
        for i, snap in enumerate(w.trace):
            bound = [n for n, v in snap.items() if isinstance(v, np.ndarray) and (n not in prev or prev[n] is not v)]
            prev = snap
            if not bound:
                continue
            first = i if first is None else first
            chain.append(i)
            held = {n: frozenset(np.unique(v % width).tolist()) for n, v in snap.items() if isinstance(v, np.ndarray)}
            picks = [p if p is not None and p not in bound else next((n for n in bound if held[n] == s), None)
                     for p, s in zip(picks, sets)]
            if all(picks) and len(set(picks)) == 3:
                last, names = i, tuple(picks)  # type: ignore[assignment]
                break
        if first is None or last is None:
            return None
        found.add((first, last, tuple(chain), names))
    return found.pop() if len(found) == 1 else None  # type: ignore[return-value]


_CACHE: dict[tuple, tuple[cst.CSTNode, FusedLayout | None]] = {}


def fused_layout(info: ClassInfo, attr: str, call: cst.Call, head_dim: str,
                 linear: tuple[str, str]) -> FusedLayout | None:
    """The layout of the fused projection ATTR feeding the attention CALL (its positional q, k, v
    arguments after the module), when every world of both sample chains agrees on one (computed
    once per class node)."""
    key = (id(info.node), attr, code(call), head_dim, linear)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is info.node:
        return hit[1]
    out = _fused_layout(info, attr, call, head_dim, linear)
    _CACHE[key] = (info.node, out)
    return out


def _fused_layout(info: ClassInfo, attr: str, call: cst.Call, head_dim: str,
                  linear: tuple[str, str]) -> FusedLayout | None:
    args = [a.value for a in call.args if a.keyword is None][1:4]
    if len(args) != 3 or not all(isinstance(a, cst.Name) for a in args) or info.method("forward") is None:
        return None
    names = [a.value for a in args]  # type: ignore[attr-defined]
    runs = [_worlds(info, attr, names, head_dim, linear, f) for f in CHAINS]
    if any(r is None for r in runs):
        return None
    worlds = [w for r in runs for w in r]  # type: ignore[union-attr]
    d_of = [w.rows[0].shape[1] for w in worlds]
    kinds = [_grouped(w, d) for w, d in zip(worlds, d_of)]
    # grouped per KV head in every world (Falcon), or flat [q; k; v] in every world however the
    # code splits it (ergo: a view to heads split by head counts)
    kind = "flat" if all(f for _, f in kinds) else "grouped" if all(g for g, _ in kinds) else None
    if kind is None:
        return None
    heads = _heads_attr(info, worlds)
    region = _region(worlds)
    if heads is None or region is None:
        return None
    first, last, chain, qkv_names = region
    fwd = info.method("forward")
    st = fwd.body.body[first]  # type: ignore[union-attr]
    out_name = None
    if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())])])):
        out_name = st.body[0].targets[0].target.value  # type: ignore[attr-defined]
    helpers = tuple(dict.fromkeys(h for w in worlds for h in w.called))
    return FusedLayout(kind, heads, helpers, first, last, chain, out_name, qkv_names)


def describe(layout: FusedLayout, fwd: cst.FunctionDef) -> str:
    """One line for diagnostics and tests."""
    body = fwd.body.body  # type: ignore[attr-defined]
    return f"{layout.kind}: heads {layout.num_heads}; split by {code(body[layout.last]).strip().splitlines()[0]}"


def same_value_attr(model: ClassInfo, value: cst.BaseExpression, attn: ClassInfo) -> str | None:
    """The first `self.` attribute of ATTN's `__init__` whose value is VALUE's, read in MODEL's
    `__init__` context (`1 / math.sqrt(self.config.hidden_size // self.num_heads)` in Falcon's
    model is the attention's `self.inv_norm_factor`), for both sample chains; None if none is."""
    found: list[set[str]] | None = None
    for factors in CHAINS:
        config = _Config({}, {}, _chain(factors))
        try:
            m_run = _Run(model, "", config)
            env = m_run.init()
            want = m_run.interp.expr(value, env)
            a_run = _Run(attn, "", config)
            a_run.init()
        except Unknown:
            return None
        if not isinstance(want, (int, float)) or isinstance(want, bool):
            return None
        names = {n for n, v in a_run.attrs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                 and abs(v - want) <= 1e-12 * max(1.0, abs(want))}
        found = names if found is None else found & names
    from porter.analysis.layouts import init_attrs

    return next((n for n in init_attrs(attn) if n in (found or set())), None)
