"""State-space mixers: an HF Mamba-2 mixer class recognised by what it builds and how its forward
flows, and the engine's `MambaMixer2` arguments read from its constructor.

A Mamba-2 mixer builds one depthwise `nn.Conv1d` (groups = channels), projects its input with one
linear whose output it splits in three (gate, conv input, dt), discretises with `-exp(A_log)`,
splits the convolved states in three (x, B, C) and views them per head and per group, gates a norm
with the first split and projects back with a second linear. What the engine's layer takes (sizes,
biases, eps, activation) is read from those calls, with every `self.<attr>` replaced by the
expression `__init__` bound it to and the mixer's parameters by what its builder passes, so the
arguments are written over the builder's own `config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, dotted, findall, param_names, self_attr, self_call_attr
from porter.analysis.index import ClassInfo, ModelIndex

CONV1D = "torch.nn.Conv1d"
# what the HF cache object's state API is called (the mixer reads and writes its own state there)
STATE_API = frozenset({"has_previous_state", "conv_states", "recurrent_states", "ssm_states",
                       "update_conv_state", "update_recurrent_state"})


@dataclass
class SsmPlan:
    cls: str  # the HF mixer class (the port builds the engine's layer instead)
    host: str  # the class that builds it
    attr: str  # the host's attribute holding it
    kind: str  # "mamba2" (the engine's MambaMixer2) | "short_conv" (its ShortConv)
    args: dict[str, str]  # engine keyword -> expression over the host's __init__ locals
    # HF's gated norm normalises over the full width (the engine's per group of n_groups)
    norm_full_width: bool = True
    params: dict[str, str] = field(default_factory=dict)  # engine parameter -> HF parameter name
    line: int = 0
    # the bounds HF clamps the time step to (`dt_limit=`), over the builder's config; the engine's
    # MambaMixer2 clamps to (0, inf) only
    dt_limit: str | None = None


def _kwargs(call: cst.Call) -> dict[str, cst.BaseExpression]:
    return {a.keyword.value: a.value for a in call.args if a.keyword is not None}


def _arg(call: cst.Call, pos: int, kw: str) -> cst.BaseExpression | None:
    kws = _kwargs(call)
    if kw in kws:
        return kws[kw]
    positional = [a.value for a in call.args if a.keyword is None and not a.star]
    return positional[pos] if pos < len(positional) else None


def _split_names(fwd: cst.FunctionDef, source: str) -> tuple[list[str], list[cst.BaseExpression]] | None:
    """`a, b, c = SOURCE.split([s1, s2, s3], dim=-1)` or `torch.split(SOURCE, [...], dim=-1)`:
    the three names and sizes."""
    for node in findall(fwd, m.Assign(targets=[m.AssignTarget(m.Tuple())], value=m.Call())):
        call = node.value  # type: ignore[attr-defined]
        els = node.targets[0].target.elements  # type: ignore[attr-defined]
        if len(els) != 3 or not all(isinstance(e.value, cst.Name) for e in els):
            continue
        if m.matches(call.func, m.Attribute(value=m.Name(source), attr=m.Name("split"))):
            sizes = _arg(call, 0, "split_size")
        elif dotted(call.func) == "torch.split" and call.args and m.matches(call.args[0].value, m.Name(source)):
            sizes = _arg(call, 1, "split_size_or_sections")
        else:
            continue
        if isinstance(sizes, cst.List) and len(sizes.elements) == 3:
            return [e.value.value for e in els], [e.value for e in sizes.elements]
    return None


def _assigned_from(fwd: cst.FunctionDef, name: str) -> set[str]:
    """Names bound from an expression reading NAME (one step of dataflow)."""
    out = set()
    for node in findall(fwd, m.Assign(targets=[m.AssignTarget(m.Name())])):
        if findall(node.value, m.Name(name)):  # type: ignore[attr-defined]
            out.add(node.targets[0].target.value)  # type: ignore[attr-defined]
    return out


def _view_tail(fwd: cst.FunctionDef, names: set[str]) -> tuple[cst.BaseExpression, cst.BaseExpression] | None:
    """`N.view(b, l, X, Y)` for N in NAMES: (X, Y)."""
    for call in findall(fwd, m.Call(func=m.Attribute(attr=m.Name("view")))):
        base = call.func.value  # type: ignore[attr-defined]
        if isinstance(base, cst.Name) and base.value in names and len(call.args) == 4:  # type: ignore[attr-defined]
            return call.args[2].value, call.args[3].value  # type: ignore[attr-defined]
    return None


class _AsSelf(cst.CSTTransformer):
    """`module.x` -> `self.x`: a module function's reads of the mixer it is handed, in the mixer's scope."""

    def __init__(self, module: str) -> None:
        super().__init__()
        self.module = module

    def leave_Name(self, original, updated):
        return updated.with_changes(value="self") if updated.value == self.module else updated


def _callee_view_tail(idx: ModelIndex, fwd: cst.FunctionDef, name: str) -> tuple[cst.BaseExpression, ...] | None:
    """Where the mixer hands NAME to a module function of the file together with itself (5.25's
    `mamba2_scan_forward(self, hidden_states, B, C, dt, cache)`: a hub kernel may replace it, and
    without one the function's own code is what runs), the view of NAME in that function (`x.view(b,
    l, X, Y)` of NAME or of a name split from it), with its reads of the mixer read as `self.`."""
    for call in findall(fwd, m.Call(func=m.Name())):
        fn = idx.functions.get(call.func.value)  # type: ignore[attr-defined]
        if fn is None:
            continue
        given = dict(zip(param_names(fn), [a.value for a in call.args if a.keyword is None and not a.star]))  # type: ignore[attr-defined]
        given |= {a.keyword.value: a.value for a in call.args if a.keyword is not None}  # type: ignore[attr-defined]
        module = next((p for p, v in given.items() if m.matches(v, m.Name("self"))), None)
        param = next((p for p, v in given.items() if m.matches(v, m.Name(name))), None)
        if module is None or param is None:
            continue
        split = {e.value.value for node in findall(fn, m.Assign(targets=[m.AssignTarget(m.Tuple())]))
                 if findall(node.value, m.Name(param))  # type: ignore[attr-defined]
                 for e in node.targets[0].target.elements if isinstance(e.value, cst.Name)}  # type: ignore[attr-defined]
        tail = _view_tail(fn, {param} | split)
        if tail is not None:
            return tuple(t.visit(_AsSelf(module)) for t in tail)  # type: ignore[misc]
    return None


def mamba2_roles(idx: ModelIndex, info: ClassInfo) -> dict | None:
    """The roles of a Mamba-2 mixer's parts and the expressions (in its own `__init__` scope) the
    engine's MambaMixer2 takes; None when INFO is not one."""
    fwd, init = info.method("forward"), info.method("__init__")
    convs = [s for s in info.submodules.values() if idx.qualify(s.ctor) == CONV1D or s.ctor == CONV1D]
    if fwd is None or init is None or len(convs) != 1:
        return None
    conv = convs[0]
    ckw = _kwargs(conv.call)
    channels = _arg(conv.call, 0, "in_channels")
    if "groups" not in ckw or channels is None or code(ckw["groups"]) != code(channels):
        return None  # not depthwise
    a_log = [self_attr(c.args[0].value.func.value) for c in findall(fwd, m.Call(func=m.Attribute(
        value=m.Name("torch"), attr=m.Name("exp")), args=[m.Arg(m.Call(func=m.Attribute(attr=m.Name("float"))))]))]
    a_log = [a for a in a_log if a]
    linears = info.linears()
    in_proj = next((a for a in linears for node in findall(fwd, m.Assign(targets=[m.AssignTarget(m.Name())]))
                    if self_call_attr(node.value) == a), None)  # type: ignore[attr-defined]
    if not a_log or in_proj is None:
        return None
    proj_out = next(node.targets[0].target.value for node in findall(  # type: ignore[attr-defined]
        fwd, m.Assign(targets=[m.AssignTarget(m.Name())])) if self_call_attr(node.value) == in_proj)  # type: ignore[attr-defined]
    outer = _split_names(fwd, proj_out)
    if outer is None:
        return None
    (gate, xbc, _dt), (_, _, num_heads) = outer
    inner = next((s for src in {xbc} | _assigned_from(fwd, xbc) if (s := _split_names(fwd, src))), None)
    out_proj = next((a for a in linears if a != in_proj), None)
    norm = next((self_attr(c.func) for c in findall(fwd, m.Call(func=m.Attribute(value=m.Name("self")),
                                                                 args=[m.Arg(), m.Arg(m.Name(gate))]))), None)
    if inner is None or out_proj is None or norm is None or norm not in info.submodules:
        return None
    (x, b, _c), (_, group_state, _) = inner
    heads = _view_tail(fwd, {x}) or _callee_view_tail(idx, fwd, x)
    groups = _view_tail(fwd, {b}) or _callee_view_tail(idx, fwd, b)
    if heads is None or groups is None:
        return None
    n_groups, state = groups
    if code(state) == "-1":  # `B.view(b, l, G, -1)`: the state size is G's co-factor in the split size
        if not (isinstance(group_state, cst.BinaryOperation) and isinstance(group_state.operator, cst.Multiply)):
            return None
        state = group_state.right if code(group_state.left) == code(n_groups) else group_state.left
    kw = {k: v for k, v in _kwargs_in(fwd, "D").items()}
    norm_call = info.submodules[norm].call
    eps = _arg(norm_call, 1, "eps")
    norm_cls = idx.classes.get(info.submodules[norm].ctor)
    if eps is None and norm_cls is not None and (ninit := norm_cls.method("__init__")) is not None:
        eps = next((p.default for p in ninit.params.params if p.name.value == "eps" and p.default), None)
    act = next((a.value for c in findall(fwd, m.Call()) for a in c.args  # type: ignore[attr-defined]
                if a.keyword is not None and a.keyword.value == "activation"), None)
    group_size = _kwargs(norm_call).get("group_size")
    if group_size is not None and code(group_size) != f"{code(_arg(linears[out_proj].call, 0, 'in_features'))} // {code(n_groups)}":
        return None  # a norm grouped otherwise than by the mixer's groups (the engine's norm groups by n_groups)
    in_call, out_call = linears[in_proj].call, linears[out_proj].call
    bias = _arg(in_call, 2, "bias")
    if code(bias or cst.Name("True")) != code(_arg(out_call, 2, "bias") or cst.Name("True")):
        return None  # the engine's layer takes one bias flag for both projections
    args = {
        "hidden_size": _arg(in_call, 0, "in_features"),
        "ssm_state_size": state,
        "conv_kernel_size": ckw.get("kernel_size"),
        "intermediate_size": _arg(out_call, 0, "in_features"),
        "use_conv_bias": ckw.get("bias", cst.Name("True")),
        "use_bias": bias or cst.Name("True"),
        "n_groups": n_groups,
        "num_heads": num_heads,
        "head_dim": heads[1],
        "rms_norm_eps": eps if eps is not None else cst.Float("1e-6"),
        "activation": act if act is not None else cst.SimpleString('"silu"'),
    }
    if any(v is None for v in args.values()):
        return None
    params = {"A": a_log[0], "D": self_attr(kw.get("D")) or "D", "dt_bias": self_attr(kw.get("dt_bias")) or "dt_bias",
              "conv1d": conv.attr, "in_proj": in_proj, "out_proj": out_proj, "norm": norm}
    return {"args": args, "params": params, "norm_full_width": not _norm_grouped(norm_cls), "dt_limit": _dt_limit(fwd)}


def _dt_limit(fwd: cst.FunctionDef) -> cst.BaseExpression | None:
    """What the mixer hands its scan as `dt_limit` (`dt_limit=self.time_step_limit`, or in a dict
    of keywords `{"dt_limit": ...}`): the bounds the time step is clamped to after its softplus."""
    found = [a.value for a in findall(fwd, m.Arg(keyword=m.Name("dt_limit")))]  # type: ignore[attr-defined]
    found += [e.value for e in findall(fwd, m.DictElement(key=m.SimpleString()))  # type: ignore[attr-defined]
              if e.key.evaluated_value == "dt_limit"]  # type: ignore[attr-defined]
    return found[0] if found and all(code(f) == code(found[0]) for f in found) else None


def _kwargs_in(fwd: cst.FunctionDef, key: str) -> dict[str, cst.BaseExpression]:
    """The keywords of the first call in FWD that passes KEY= (the scan's `D=self.D, dt_bias=...`)."""
    for call in findall(fwd, m.Call()):
        kws = _kwargs(call)  # type: ignore[arg-type]
        if key in kws:
            return kws
    return {}


def _norm_grouped(norm_cls: ClassInfo | None) -> bool:
    """HF's gated norm views its input per group before the variance (`x.view(b, l, self.n_groups,
    -1)`), as the engine's does; False when it normalises the full width."""
    fwd = norm_cls.method("forward") if norm_cls else None
    return bool(fwd and any(len(c.args) >= 3 for c in findall(fwd, m.Call(func=m.Attribute(attr=m.Name("view"))))))


class _Substitute(cst.CSTTransformer):
    def __init__(self, attrs: dict[str, cst.BaseExpression], names: dict[str, cst.BaseExpression]) -> None:
        super().__init__()
        self.attrs, self.names, self.unresolved = attrs, names, []

    def leave_Attribute(self, original, updated):
        attr = self_attr(updated)
        if attr is None:
            return updated
        if attr in self.attrs:
            return self.attrs[attr]
        self.unresolved.append(f"self.{attr}")
        return updated

    def leave_Name(self, original, updated):
        return self.names.get(updated.value, updated)


def _init_bindings(init: cst.FunctionDef) -> dict[str, cst.BaseExpression]:
    """`self.X = EXPR` at the top of `__init__` (first binding of each attribute)."""
    out: dict[str, cst.BaseExpression] = {}
    for st in init.body.body:
        if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))])])):
            attr = self_attr(st.body[0].targets[0].target)  # type: ignore[attr-defined]
            if attr is not None and attr not in out:
                out[attr] = st.body[0].value  # type: ignore[attr-defined]
    return out


def _call_bindings(init: cst.FunctionDef, call: cst.Call) -> dict[str, cst.BaseExpression] | None:
    """The mixer's `__init__` parameters bound to what its builder passes (defaults where it passes
    nothing); None when a parameter it reads cannot be bound."""
    params = init.params.params[1:]
    out: dict[str, cst.BaseExpression] = {}
    positional = [a.value for a in call.args if a.keyword is None and not a.star]
    for i, p in enumerate(params):
        if i < len(positional):
            out[p.name.value] = positional[i]
    for a in call.args:
        if a.keyword is not None:
            out[a.keyword.value] = a.value
    for p in [*params, *init.params.kwonly_params]:
        if p.name.value not in out and p.default is not None:
            out[p.name.value] = p.default
    return out


def in_host_scope(info: ClassInfo, call: cst.Call, exprs: dict[str, cst.BaseExpression]) -> dict[str, str] | None:
    """EXPRS (over the mixer's `self.` attributes and parameters) rewritten over what the builder
    CALL passes: `int(self.expand * self.hidden_size)` -> `int(config.expand * config.hidden_size)`."""
    init = info.method("__init__")
    assert init is not None
    attrs, names = _init_bindings(init), _call_bindings(init, call)
    if names is None:
        return None
    out = {}
    for key, value in exprs.items():
        for _ in range(8):  # attributes bound from attributes (`self.conv_dim = self.intermediate_size + ...`)
            sub = _Substitute(attrs, {})
            value = value.visit(sub)
            if sub.unresolved or not findall(value, m.Attribute(value=m.Name("self"))):
                break
        sub = _Substitute({}, names)
        value = value.visit(sub)
        if findall(value, m.Attribute(value=m.Name("self"))):
            return None
        out[key] = code(value)
    return out


def find_mamba2_mixers(idx: ModelIndex, classes: list[str]) -> list[SsmPlan]:
    """Every state-space mixer the engine has a layer for (a Mamba-2 mixer, a gated short
    convolution) that a class of CLASSES builds as `self.<attr> = Mixer(...)`."""
    found: list[SsmPlan] = []
    for host in classes:
        hinfo = idx.classes[host]
        for sub in hinfo.submodules.values():
            info = idx.classes.get(sub.ctor)
            if info is None:
                continue
            if (roles := mamba2_roles(idx, info)) is not None:
                kind = "mamba2"
            elif (roles := short_conv_roles(idx, info)) is not None:
                kind = "short_conv"
            else:
                continue
            args = in_host_scope(info, sub.call, roles["args"])
            if args is None:
                continue
            limit = None
            if roles.get("dt_limit") is not None:  # unresolved: kept as HF wrote it (the rule refuses it)
                over = in_host_scope(info, sub.call, {"dt_limit": roles["dt_limit"]})
                limit = over["dt_limit"] if over else code(roles["dt_limit"])
            found.append(SsmPlan(cls=info.name, host=host, attr=sub.attr, kind=kind, args=args,
                                 norm_full_width=roles.get("norm_full_width", False), params=roles["params"],
                                 line=info.line, dt_limit=limit))
    return found


def _product_of(fwd: cst.FunctionDef, a: str, b: str) -> bool:
    """`a * b` (either order) somewhere in FWD."""
    return any({code(n.left), code(n.right)} == {a, b}  # type: ignore[attr-defined]
               for n in findall(fwd, m.BinaryOperation(operator=m.Multiply())))


def short_conv_roles(idx: ModelIndex, info: ClassInfo) -> dict | None:
    """A gated short convolution (LFM2's): one projection chunked in three (B, C, x), `B * x`
    convolved by a depthwise `nn.Conv1d`, `C *` the result, an output projection. The engine's
    ShortConv computes exactly that, and reads its kernel size and bias from the config as
    `config.conv_L_cache` and `config.conv_bias`; the arguments are the config, the width and the
    layer index (SHAPE holds what its state cache is sized from)."""
    fwd, init = info.method("forward"), info.method("__init__")
    convs = [s for s in info.submodules.values() if s.ctor == CONV1D]
    linears = info.linears()
    if fwd is None or init is None or len(convs) != 1 or len(linears) != 2:
        return None
    conv = convs[0]
    ckw = _kwargs(conv.call)
    channels = _arg(conv.call, 0, "in_channels")
    if "groups" not in ckw or channels is None or code(ckw["groups"]) != code(channels):
        return None
    chunk = None
    for node in findall(fwd, m.Assign(targets=[m.AssignTarget(m.Tuple())], value=m.Call(
            func=m.Attribute(attr=m.Name("chunk")), args=[m.Arg(m.Integer("3")), m.ZeroOrMore()]))):
        els = node.targets[0].target.elements  # type: ignore[attr-defined]
        if all(isinstance(e.value, cst.Name) for e in els):
            chunk = [e.value.value for e in els]
    if chunk is None or not _product_of(fwd, chunk[0], chunk[2]):
        return None  # the engine's ShortConv convolves B * x (the first and last thirds)
    if not any(chunk[1] in {code(n.left), code(n.right)}  # type: ignore[attr-defined]
               for n in findall(fwd, m.BinaryOperation(operator=m.Multiply()))):
        return None
    in_proj = next((a for a in linears if a != "out_proj" and code(_arg(linears[a].call, 1, "out_features") or cst.Name("x"))
                    .startswith("3")), None)
    out_proj = next((a for a in linears if a != in_proj), None)
    if in_proj is None or out_proj is None:
        return None
    init_params = info.method("__init__").params.params[1:]  # type: ignore[union-attr]
    if len(init_params) < 2:
        return None
    return {"args": {"config": cst.Name(init_params[0].name.value), "dim": channels,
                     "layer_idx": cst.Name(init_params[1].name.value),
                     # read by the engine from the config: checked against HF's by the rule
                     "conv_kernel_size": ckw.get("kernel_size"), "bias": ckw.get("bias", cst.Name("True")),
                     "in_bias": _arg(linears[in_proj].call, 2, "bias") or cst.Name("True"),
                     "out_bias": _arg(linears[out_proj].call, 2, "bias") or cst.Name("True")},
            "params": {"conv": conv.attr, "in_proj": in_proj, "out_proj": out_proj}}


def reads_state(info: ClassInfo) -> cst.CSTNode | None:
    """The first place INFO reads or writes a recurrent state in HF's cache object
    (`cache_params.has_previous_state(...)`, `.conv_states[...]`, `.update_recurrent_state(...)`)."""
    for node in findall(info.node, m.Attribute(attr=m.Name(m.MatchIfTrue(lambda n: n in STATE_API)))):
        return node
    return None


def checkpoint_renames(mixers: list[SsmPlan]) -> list[tuple[str, str]]:
    """(regex, replacement) from HF's parameter names to the engine layer's (`.mixer.A_log` ->
    `.mixer.A`: the engine's loader takes the log and stores -exp of it)."""
    out: list[tuple[str, str]] = []
    for p in mixers:
        for engine, hf in p.params.items():
            if engine != hf and (rename := (rf"\.{p.attr}\.{hf}$", f".{p.attr}.{engine}")) not in out:
                out.append(rename)
    return out


def recurrent_blocker(idx: ModelIndex, classes: list[str]):
    """The error for a kept class that still reads or writes a recurrent state in HF's cache (a
    layer beside the mapped mixers that no rule maps to the engine's state cache), else None."""
    for name in classes:
        info = idx.classes[name]
        node = reads_state(info)
        if node is None:
            continue
        fn = next((f.name.value for f in info.node.body.body if isinstance(f, cst.FunctionDef)
                   and findall(f, m.Attribute(attr=m.Name(node.attr.value)))), "?")  # type: ignore[attr-defined]
        return idx.error(
            "recurrent state carried from one step to the next in a layer no rule maps to the engine's "
            "state cache (its Mamba-2 mixers are mapped: MambaMixer2)" + mamba1_note(idx, [name]),
            node, construct=f"{name}.{fn}: {code(node)}")
    return None


def mamba1_note(idx: ModelIndex, classes: list[str]) -> str:
    """A sentence for a Mamba-1 selective scan among CLASSES (a depthwise conv, `-exp(A_log)`, and
    the time step projected by a linear of its own: x_proj -> dt_proj): the engine's MambaMixer
    runs it with `selective_scan_fwd`, which its CPU build lacks, so porter has no layer to map it to."""
    for name in classes:
        info = idx.classes[name]
        fwd = info.method("forward")
        convs = [s for s in info.submodules.values() if s.ctor == CONV1D]
        if fwd is None or len(convs) != 1 or mamba2_roles(idx, info) is not None:
            continue
        text = code(info.node)
        if "torch.exp(" in text and _time_step_projected(fwd, info):
            return (f"; {name} is a Mamba-1 selective scan, which the engine runs with `selective_scan_fwd`, "
                    "missing from its CPU build: it cannot be run or verified here")
    return ""


def _time_step_projected(fwd: cst.FunctionDef, info: ClassInfo) -> bool:
    """Mamba-1's time step: one projection's output split (`dt, B, C = torch.split(self.x_proj(x),
    ...)`) and a part of it projected again (`self.dt_proj(dt)`, `self.dt_proj.weight @ dt`, Zamba's
    per-head `self.dt_proj_weight[:, None] @ dt`). A gated delta-net projects its gates from the
    hidden states themselves, never from another projection's output."""
    linears = set(info.linears())

    def projects(node: cst.CSTNode, reads: set[str] | None = None) -> bool:
        """NODE applies a projection of the module (to a name of READS, when given)."""
        def given(x: cst.CSTNode) -> bool:
            return reads is None or bool(findall(x, m.Name(m.MatchIfTrue(lambda n: n in reads))))
        calls = [c for c in findall(node, m.Call()) if self_call_attr(c) in linears and given(c)]
        products = [b for b in findall(node, m.BinaryOperation(operator=m.MatrixMultiply()))
                    if findall(b.left, m.Attribute(value=m.Name("self"))) and given(b.right)]  # type: ignore[attr-defined]
        return bool(calls or products)

    projected = {n.targets[0].target.value for n in findall(fwd, m.Assign(targets=[m.AssignTarget(m.Name())]))  # type: ignore[attr-defined]
                 if projects(n.value)}  # type: ignore[attr-defined]
    for node in findall(fwd, m.Assign(targets=[m.AssignTarget(m.Tuple())], value=m.Call())):
        call = node.value  # type: ignore[attr-defined]
        source = call.args[0].value if dotted(call.func) == "torch.split" and call.args else \
            call.func.value if m.matches(call.func, m.Attribute(attr=m.Name("split"))) else None  # type: ignore[attr-defined]
        if source is None or not (projects(source) or (isinstance(source, cst.Name) and source.value in projected)):
            continue
        parts = {e.value.value for e in node.targets[0].target.elements if isinstance(e.value, cst.Name)}  # type: ignore[attr-defined]
        if any(projects(st, parts) for st in findall(fwd, m.Assign()) if st is not node):
            return True
    return False


def dt_limit_note(idx: ModelIndex, classes: list[str]) -> str:
    """A clause for a Mamba-2 mixer among CLASSES whose time step HF clamps to bounds it computes
    (`self.time_step_limit = (config.time_step_min, float("inf"))`): the engine's MambaMixer2
    clamps it to (0, inf) only, so PT260 refuses it wherever it is built."""
    for name in classes:
        info = idx.classes[name]
        roles = mamba2_roles(idx, info)
        init = info.method("__init__")
        if roles is None or roles["dt_limit"] is None or init is None:
            continue
        limit = roles["dt_limit"]
        if (attr := self_attr(limit)) is not None and attr in (bound := _init_bindings(init)):
            limit = bound[attr]
        if not m.matches(limit, m.Attribute(value=m.Name())):
            return (f"; {name}, a Mamba-2 mixer, clamps its time step to {code(limit)}, and the engine's "
                    "MambaMixer2 clamps it to (0, inf) only")
    return ""


def engine_layer_note(table, model_type: str) -> str:
    """What the engine can run of a model type's state layer no rule maps (rules/hf_strip.yaml
    `engine_state_layers`: the engine's layer and whether its CPU build runs it), as a clause."""
    note = table.engine_state_layers.get(model_type)
    return f"; {note}" if note else ""


__all__ = ["SsmPlan", "checkpoint_renames", "dt_limit_note", "engine_layer_note", "find_mamba2_mixers", "mamba1_note", "mamba2_roles", "reads_state",
           "recurrent_blocker", "in_host_scope", "param_names"]
