"""Mixture-of-experts blocks, recognised by dataflow.

A block is a module whose forward sends its input through a *router* (a projection to one logit
per expert, then top-k over them) and passes the router's top-k indices and weights, together
with the input, to an *experts* module (3-D weights indexed per expert, the per-expert outputs
scaled by their routing weight and summed with `index_add_`). That is the engine's `FusedMoE`:
the router stays a plain projection (`GateLinear`), top-k, softmax and the weighted sum move into
the fused kernel. What the kernel needs is read from the source, not from names:

- number of experts and hidden size: the router weight's shape `(E, H)`;
- top-k: the `k` of the router's `topk` call;
- scoring: softmax over the logits, or a sigmoid of each logit taken as the top-k input (no
  correction bias: the router holds its weight and nothing else) -> `scoring_func="sigmoid"`;
- renormalisation: the top-k weights divided by their sum (under an `if self.flag:` the flag's
  config attribute), or a softmax taken over the top-k logits only (the same thing);
- intermediate size: the experts' down projection shape `(E, H, I)`;
- activation: the experts' `ACT2FN[...]` key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, dotted, findall, param_names, self_attr, self_call_attr
from porter.analysis.index import LINEAR_NAMES, ClassInfo, ModelIndex
from porter.analysis.moe_oai import swigluoai_experts
from porter.analysis.moe_branches import read_routing as read_router
from porter.analysis.moe_router import Routing


@dataclass(frozen=True)
class MoePlan:
    cls: str  # the block
    router: str  # attribute of the router module in the block
    router_cls: str
    experts: str  # attribute of the experts module in the block
    experts_cls: str
    num_experts: str  # expressions over the block's __init__ parameters
    top_k: str
    hidden_size: str
    intermediate_size: str
    renormalize: str
    activation: str
    gate_up: str  # the experts' packed gate/up parameter (HF in-memory name)
    down: str
    line: int
    # checkpoint names of one expert's gate, down and up projections (transformers'
    # conversion mapping un-packs the in-memory 3-D tensors into experts.N.<name>)
    ckpt_names: list[str] = field(default_factory=lambda: ["gate_proj", "down_proj", "up_proj"])
    packed: bool = False  # the checkpoint keeps the 3-D tensors (no per-expert un-packing on save)
    scoring_func: str = "softmax"  # or "sigmoid": top-k over sigmoid(logits)
    transposed: bool = False  # per-expert weights stored (experts, in, out): applied as x @ W[e]
    router_weight: str = "weight"  # the router's projection weight, relative to the router module
    # a score-correction bias: "gate" (the router's own, kept on the port's gate as the engine's
    # ports do) or the block attribute the block hands to its router
    correction_bias: str | None = None
    n_group: str | None = None  # grouped top-k: groups of experts, and how many groups are kept
    topk_group: str | None = None
    routed_scaling: str | None = None  # the top-k weights' scalar factor
    # a router the engine's cannot express: kept, a GateLinear whose `route` (its own code after the
    # logits, assigned to `router_logits`) is FusedMoE's custom_routing_function; route_outputs:
    # the positions of (weights, indices) among what its forward returned
    routing_function: bool = False
    router_logits: str = ""
    route_outputs: list[int] = field(default_factory=list)
    router_dims: list[str] = field(default_factory=list)
    router_bias: bool = False  # the router's projection has a bias (the gate's, loaded with it)
    # (function) what else the block hands its router: [forward parameter, block expression over
    # `self.`], bound to the route with functools.partial (lfm2_moe's `expert_bias`)
    route_args: list[list[str]] = field(default_factory=list)
    # experts with biases: (gate_up bias, down bias) attributes; the swigluoai activation's (alpha, limit)
    expert_bias: list[str] = field(default_factory=list)
    swiglu: list[str] = field(default_factory=list)
    # experts holding their weights flat in a module inside (dbrx, porter/analysis/moe_flat.py):
    # [inner attribute, its class, gate, up, down weights]; routed by the block's own method
    # `route_method` (FusedMoE's custom_routing_function), the router a module kept as it is
    flat: list[str] = field(default_factory=list)
    route_method: str = ""
    # a block routing inline and looping over a list of expert MLPs (transformers 4.x Mixtral,
    # porter/analysis/moe_inline.py): the block's forward becomes the gate and FusedMoE call
    inline: bool = False


# routing fields left out of PORT.json where they hold their default (other ports' PORT.json unchanged)
_ROUTING_DEFAULTS = {"router_weight": "weight", "correction_bias": None, "n_group": None, "topk_group": None,
                     "routed_scaling": None, "routing_function": False, "router_logits": "", "route_outputs": [],
                     "router_dims": [], "router_bias": False, "expert_bias": [], "swiglu": [],
                     "route_args": [], "flat": [], "route_method": "", "inline": False}


def compact_moe(d: dict) -> None:
    for key, default in _ROUTING_DEFAULTS.items():
        value = d.get(key, default)
        if value == default or (default == [] and not value):  # (a sealed plan's lists are tuples)
            d.pop(key, None)


def _init_attrs(info: ClassInfo) -> dict[str, cst.BaseExpression]:
    out: dict[str, cst.BaseExpression] = {}
    init = info.method("__init__")
    if init is None:
        return out
    for node in findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))])):
        out.setdefault(self_attr(node.targets[0].target), node.value)  # type: ignore[attr-defined, arg-type]
    return out


def _param_shape(value: cst.BaseExpression) -> list[cst.BaseExpression] | None:
    """`nn.Parameter(torch.empty(a, b, c))` -> [a, b, c]."""
    if not m.matches(value, m.Call(func=m.Attribute(attr=m.Name("Parameter")) | m.Name("Parameter"))):
        return None
    inner = value.args[0].value if value.args else None  # type: ignore[attr-defined]
    if not m.matches(inner, m.Call(func=m.Attribute(value=m.Name("torch")))):
        return None
    dims = [a.value for a in inner.args if a.keyword is None]  # type: ignore[union-attr]
    return [e.value for e in dims[0].elements] if len(dims) == 1 and isinstance(dims[0], cst.Tuple) else dims


class _Subst(cst.CSTTransformer):
    def __init__(self, attrs: dict[str, cst.BaseExpression], params: dict[str, cst.BaseExpression]) -> None:
        super().__init__()
        self.attrs, self.params = attrs, params

    def leave_Attribute(self, original, updated):
        attr = self_attr(updated)
        if attr is not None and attr in self.attrs:
            return self.attrs[attr]
        return updated

    def leave_Name(self, original, updated):
        return self.params.get(updated.value, updated)


def _resolve(node: cst.BaseExpression, info: ClassInfo, call: cst.Call | None) -> str:
    """An expression of `info`'s __init__ over `self.x` attributes, rewritten over the arguments
    its constructor is called with (the block's own names)."""
    attrs = _init_attrs(info)
    init = info.method("__init__")
    params: dict[str, cst.BaseExpression] = {}
    if init is not None and call is not None:
        names = [p for p in param_names(init) if p != "self"]
        pos = [a for a in call.args if a.keyword is None]
        for p, a in zip(names, pos):
            params[p] = a.value
        for a in call.args:
            if a.keyword is not None:
                params[a.keyword.value] = a.value
    for _ in range(4):  # self.x may be defined from another self.y
        new = node.visit(_Subst(attrs, {}))
        if new.deep_equals(node):
            break
        node = new  # type: ignore[assignment]
    return code(node.visit(_Subst({}, params)))


# `x @ self.w[e]`: a per-expert weight applied in the (in, out) layout
_PER_EXPERT_MATMUL = m.BinaryOperation(operator=m.MatrixMultiply(), right=m.Subscript(value=m.Attribute(value=m.Name("self"))))


class MoeFinder:
    def __init__(self, idx: ModelIndex) -> None:
        self.idx = idx

    # -- the router: one logit per expert, then the engine's routing (porter/analysis/moe_router.py)
    def router(self, info: ClassInfo) -> Routing | None:
        fwd = info.method("forward")
        if fwd is None:
            return None
        linears = {a: s.call for a, s in info.submodules.items() if s.ctor in LINEAR_NAMES}
        routing = read_router(info, _init_attrs(info), linears, self._linear_base(info))
        # a module of the file inside the router (ernie4_5_moe's moe_statics adds a correction
        # bias to the scores top-k ranks): only as part of the router's own code (a routing function)
        if routing is not None and not routing.function and any(
                sub.ctor in self.idx.classes for sub in info.submodules.values()):
            return None
        return routing

    def _linear_base(self, info: ClassInfo) -> list[cst.BaseExpression] | None:
        """(in, out) of a router that is a bias-free nn.Linear itself (`super().__init__(h, e, bias=False)`)."""
        init = info.method("__init__")
        if init is None or not any(self.idx.qualify(b) in LINEAR_NAMES for b in info.bases):
            return None
        for call in findall(init, m.Call(func=m.Attribute(value=m.Call(func=m.Name("super")), attr=m.Name("__init__")))):
            pos = [a.value for a in call.args if a.keyword is None]  # type: ignore[attr-defined]
            bias = next((a.value for a in call.args if a.keyword and a.keyword.value == "bias"), None)  # type: ignore[attr-defined]
            if len(pos) == 2 and m.matches(bias, m.Name("False")):
                return pos
        return None

    # -- the experts: 3-D weights indexed per expert, outputs summed with index_add_ ------------
    def experts(self, info: ClassInfo) -> dict | None:
        fwd = info.method("forward")
        if fwd is None or not findall(fwd, m.Call(func=m.Attribute(attr=m.Name("index_add_")))):
            return None
        attrs = _init_attrs(info)
        three_d = {a: s for a, v in attrs.items() if (s := _param_shape(v)) is not None and len(s) == 3}
        if len(three_d) != 2:
            return None
        two_d = {a: s for a, v in attrs.items() if (s := _param_shape(v)) is not None and len(s) == 2}
        if two_d:  # biases beside the weights: only the engine's swigluoai experts (gpt_oss) are read
            return swigluoai_experts(info, three_d, two_d)
        gate_up = None
        transposed = False
        chunked = [c.func.value for c in findall(fwd, m.Call(func=m.Attribute(value=m.Call(), attr=m.Name("chunk"))))]  # type: ignore[attr-defined]
        for inner in chunked + _chunked_by_method(info, fwd):
            for a in inner.args:
                if m.matches(a.value, m.Subscript()) and self_attr(a.value.value) in three_d:
                    gate_up = self_attr(a.value.value)
        # `(x @ self.gate_up_proj[e]).chunk(2)`: weights stored (experts, in, out) (Aria), the
        # transpose of FusedMoE's (experts, out, in); both products must be written that way
        for call in findall(fwd, m.Call(func=m.Attribute(value=_PER_EXPERT_MATMUL, attr=m.Name("chunk")))):
            if gate_up is None and self_attr(call.func.value.right.value) in three_d:  # type: ignore[attr-defined]
                gate_up, transposed = self_attr(call.func.value.right.value), True  # type: ignore[attr-defined]
        if gate_up is None:
            return None
        down = next(a for a in three_d if a != gate_up)
        if transposed and not any(self_attr(p.right.value) == down  # type: ignore[attr-defined]
                                  for p in findall(fwd, _PER_EXPERT_MATMUL)):
            return None
        act = None
        for a, v in attrs.items():
            if m.matches(v, m.Subscript(value=m.Name("ACT2FN"))):
                act = v.slice[0].slice.value  # type: ignore[attr-defined]
            elif (dotted(v) or "").split(".")[-2:] in (["F", "silu"], ["functional", "silu"]):
                act = cst.SimpleString('"silu"')  # `self.act_fn = F.silu`: the engine's "silu"
        if act is None:
            return None
        # the intermediate size: (experts, hidden, intermediate) as FusedMoE stores it, else transposed
        inter = three_d[down][1 if transposed else 2]
        return {"gate_up": gate_up, "down": down, "intermediate": inter, "act": act, "transposed": transposed}

    # -- the block ----------------------------------------------------------------------------
    def block(self, info: ClassInfo) -> MoePlan | None:
        fwd = info.method("forward")
        if fwd is None:
            return None
        router = experts = None
        for attr, sub in info.submodules.items():
            cls = self.idx.classes.get(sub.ctor)
            if cls is None:
                continue
            if router is None and (r := self.router(cls)):
                router = (attr, cls, sub, r)
            elif experts is None and (e := self.experts(cls)):
                experts = (attr, cls, sub, e)
        if router is None or experts is None:
            return None
        r_attr, r_cls, r_sub, r = router
        e_attr, e_cls, e_sub, e = experts
        # dataflow: the experts call reads what the router call returned
        calls = [c for c in findall(fwd, m.Call()) if self_call_attr(c) == e_attr]
        routes = [n for n in findall(fwd, m.Assign(value=m.Call()))
                  if self_call_attr(n.value) == r_attr]  # type: ignore[attr-defined]
        if len(calls) != 1 or len(calls[0].args) != 3 or len(routes) != 1 \
                or not isinstance(routes[0].targets[0].target, cst.Tuple):  # type: ignore[attr-defined]
            return None
        returned = [el.value for el in routes[0].targets[0].target.elements]  # type: ignore[attr-defined]
        route_args: list[list[str]] | None = []
        if r.function:
            route_args = _function_outputs(fwd, r, r_cls, calls[0], routes[0], returned)
            if route_args is None:
                return None
        w_pos, i_pos = r.outputs
        # the experts read the router's top-k indices and weights as the router returned them
        if len(returned) <= max(w_pos, i_pos) or not all(
                m.matches(a.value, m.Name(t.value)) for a, t in zip(calls[0].args[1:3], (returned[i_pos], returned[w_pos]))
                if isinstance(t, cst.Name)) or not all(isinstance(t, cst.Name) for t in (returned[i_pos], returned[w_pos])):
            return None
        bias = None if route_args else _block_bias(info, r, routes[0].value)  # type: ignore[attr-defined]
        if bias == "":
            return None

        def res(node):
            return None if node is None else _resolve(node, r_cls, r_sub.call)

        return MoePlan(
            cls=info.name,
            router=r_attr,
            router_cls=r_cls.name,
            experts=e_attr,
            experts_cls=e_cls.name,
            num_experts=res(r.shape[0]),
            hidden_size=res(r.shape[1]),
            top_k=res(r.top_k),
            intermediate_size=_resolve(e["intermediate"], e_cls, e_sub.call),
            renormalize="False" if r.renormalize is None else res(r.renormalize),
            activation=_resolve(e["act"], e_cls, e_sub.call),
            gate_up=e["gate_up"],
            down=e["down"],
            line=info.line,
            scoring_func=r.scoring,
            transposed=e["transposed"],
            router_weight=r.weight,
            correction_bias=bias,
            n_group=res(r.n_group),
            topk_group=res(r.topk_group),
            routed_scaling=res(r.scale),
            routing_function=r.function,
            router_logits=r.logits,
            route_outputs=list(r.outputs) if r.function else [],
            # (function) the gate's (hidden, experts) as the router's own __init__ reads them
            router_dims=[_resolve(r.shape[1], r_cls, None), _resolve(r.shape[0], r_cls, None)] if r.function else [],
            router_bias=r.linear_bias is not None,
            route_args=route_args or [],
            expert_bias=e.get("bias", []),
            swiglu=[_resolve(c, e_cls, e_sub.call) for c in e.get("swiglu", [])],
        )


def _function_outputs(fwd: cst.FunctionDef, r: Routing, r_cls: ClassInfo, call: cst.Call, route: cst.Assign,
                      returned: list) -> list[list[str]] | None:
    """A routing function: which of the router's outputs the experts read, from the block's own call
    (set on R), and what else the block hands the router (_route_args); None where the block reads
    another of its outputs or hands it something else."""
    names = [t.value if isinstance(t, cst.Name) else None for t in returned]
    args = [a.value.value if isinstance(a.value, cst.Name) else "" for a in call.args[1:3]]
    if not all(a in names for a in args):
        return None
    r.outputs = (names.index(args[1]), names.index(args[0]))
    # what else the router returns (inkling's shared-expert gammas) the block must not read
    others = {n for n in names if n and n != "_" and n not in args}
    if any(n.value in others for st in fwd.body.body if st is not _statement_of(fwd, route)
           for n in findall(st, m.Name())):  # type: ignore[attr-defined]
        return None
    return _route_args(fwd, r_cls, route) if len(route.value.args) > 1 else []  # type: ignore[attr-defined]


def _route_args(fwd: cst.FunctionDef, r_cls: ClassInfo, route: cst.Assign) -> list[list[str]] | None:
    """What the block hands its router beside the hidden states (`self.gate(x, expert_bias)`), as
    [router forward parameter, block expression]: an expression over the block's own attributes, or
    a local the block binds once to one (`expert_bias = self.expert_bias if self.use_expert_bias else
    None`). None when an argument is anything else (a value the block computes per call)."""
    params = [p for p in param_names(r_cls.method("forward")) if p != "self"]  # type: ignore[arg-type]
    bound = {n.targets[0].target.value: n.value for st in fwd.body.body  # type: ignore[attr-defined]
             for n in findall(st, m.Assign(targets=[m.AssignTarget(m.Name())]))}
    counts: dict[str, int] = {}
    for n in findall(fwd, m.AssignTarget(m.Name())):
        counts[n.target.value] = counts.get(n.target.value, 0) + 1  # type: ignore[attr-defined]
    out = []
    for i, a in enumerate(route.value.args[1:], start=1):  # type: ignore[attr-defined]
        name = a.keyword.value if a.keyword is not None else (params[i] if i < len(params) else None)
        value = a.value
        if isinstance(value, cst.Name) and counts.get(value.value) == 1 and value.value in bound:
            value = bound[value.value]
        if name is None or name not in params or not _over_self(value):
            return None
        out.append([name, code(value)])
    return out


def _over_self(node: cst.BaseExpression) -> bool:
    """NODE reads only the block's attributes and constants (no local of its forward)."""
    attrs = {id(a.value) for a in findall(node, m.Attribute(value=m.Name("self")))}  # type: ignore[attr-defined]
    return all(id(n) in attrs or n.value in ("self", "None", "True", "False")  # type: ignore[attr-defined]
               for n in findall(node, m.Name()) if not _is_attr_name(node, n))


def _is_attr_name(root: cst.CSTNode, name: cst.CSTNode) -> bool:
    """NAME is the `.attr` part of an attribute in ROOT (not a value read)."""
    return any(a.attr is name for a in findall(root, m.Attribute()))  # type: ignore[attr-defined]


def _chunked_by_method(info: ClassInfo, fwd: cst.FunctionDef) -> list[cst.Call]:
    """`self.M(CALL)` where the class's method M chunks its one argument in two (`g, u =
    x.chunk(2, dim=-1)`) and returns the product of the activation of one half and the other
    (BeamExperts' `_apply_gate`, casts aside): CALL is the product the experts chunk."""
    out = []
    for call in findall(fwd, m.Call(func=m.Attribute(value=m.Name("self")), args=[m.Arg(m.Call(), keyword=None)])):
        method = info.method(self_attr(call.func) or "")  # type: ignore[attr-defined]
        params = [p for p in param_names(method) if p != "self"] if method else []
        if len(params) != 1 or not findall(method, m.Call(func=m.Attribute(  # type: ignore[arg-type]
                value=m.Name(params[0]), attr=m.Name("chunk")), args=[m.Arg(m.Integer("2")), m.ZeroOrMore()])):
            continue
        if findall(method, m.BinaryOperation(operator=m.Multiply(), left=m.Call(  # type: ignore[arg-type]
                func=m.Attribute(value=m.Name("self"))))):
            out.append(call.args[0].value)  # type: ignore[attr-defined]
    return out


def _block_bias(info: ClassInfo, r: Routing, call: cst.Call) -> str | None:
    """Where the correction bias lives: "gate" (the router's own), the block attribute the block
    hands its router (`self.gate(x, self.bias)`), None (no bias), "" (not read)."""
    if r.bias is not None and r.bias.startswith("self."):
        return "gate"
    if r.bias is None:
        return None if len(call.args) == 1 else ""
    args = call.args
    arg = args[r.bias_param].value if 0 <= r.bias_param < len(args) and args[r.bias_param].keyword is None else None
    bias = self_attr(arg) if arg is not None else None
    held = _init_attrs(info).get(bias or "")
    if bias is None or held is None or not m.matches(held, m.Call(func=m.Attribute(attr=m.Name("Parameter") | m.Name("Buffer")))):
        return ""
    return bias


def _statement_of(fwd: cst.FunctionDef, node: cst.CSTNode) -> cst.CSTNode | None:
    """The top-level statement of FWD that holds NODE."""
    return next((st for st in fwd.body.body if any(n is node for n in findall(st, m.Assign()))), None)  # type: ignore[attr-defined]


def find_moe_blocks(idx: ModelIndex, classes: list[str]) -> list[MoePlan]:
    finder = MoeFinder(idx)
    return [p for name in classes if (p := finder.block(idx.classes[name])) is not None]


def moe_checkpoint_names(moes: list[MoePlan], transformers_dir, keys: list[str]) -> tuple[list[MoePlan], list[tuple[str, str]]]:
    """What the checkpoint calls one expert's projections, from transformers' conversion mapping
    (read statically): `FusedMoE`'s `ckpt_names` and its load mapping. Returns the blocks with
    their checkpoint names, and the checkpoint renamings they add (regex, replacement)."""
    from porter.analysis.checkpoint_names import expert_checkpoint_names

    out, renames = [], []
    for p in moes:
        if p.flat:  # saved as in memory, flat; the router keeps its own name (and module)
            out.append(p)
            continue
        # (inline: one module per expert, saved under its own projections' names, ckpt_names)
        names = None if p.inline else expert_checkpoint_names(transformers_dir, keys, p.gate_up, p.down)
        if names is not None:
            p = dataclasses.replace(p, ckpt_names=list(names))
        elif not p.inline:
            # saved as in memory: one [experts, 2 * intermediate, hidden] tensor, which FusedMoE's
            # own loader splits (it knows the packed names gate_up_proj / down_proj)
            p = dataclasses.replace(p, packed=True)
        out.append(p)
        inner = p.router_weight.rpartition(".")[0]  # an nn.Linear inside the router (`router.gate.weight`)
        if p.router != "gate" or inner:
            # the port calls the router `gate`, a GateLinear holding the weight itself, as the
            # engine's MoE ports do
            src = rf"\.{p.router}\." + (rf"{inner}\." if inner else "")
            if (src, ".gate.") not in renames:
                renames.append((src, ".gate."))
    return out, renames


def unported_experts(idx: ModelIndex, classes: list[str], moes: list[MoePlan]) -> ClassInfo | None:
    """A class holding per-expert weights that no recognised block routes to: porting it as
    plain torch would be slow and would not shard, so the port stops there."""
    finder = MoeFinder(idx)
    done = {c for p in moes for c in (p.router_cls, p.experts_cls, *p.flat[1:2])}
    for name in classes:
        if name not in done and (finder.experts(idx.classes[name]) is not None
                                 or per_expert_loop(idx.classes[name])):
            return idx.classes[name]
    return None


def per_expert_loop(info: ClassInfo) -> bool:
    """3-D per-expert weights summed with `index_add_`, whatever the expert function (gpt_oss: a
    clamped swiglu over interleaved gate/up with biases, no ACT2FN): kept as the HF loop, the
    port would hold every expert on every rank, and its data-dependent loop over the experts hit
    does not compile (vLLM's default mode fails on it)."""
    fwd = info.method("forward")
    if fwd is not None and _masked_per_expert_loop(info, fwd):
        return True
    if fwd is None or not findall(fwd, m.Call(func=m.Attribute(attr=m.Name("index_add_")))):
        return False
    shapes = [s for v in _init_attrs(info).values() if (s := _param_shape(v)) is not None]
    if [len(s) for s in shapes].count(3) >= 2:  # (torch.empty((E, I, H)) read as its three dims)
        return True
    return flat_expert_views(info)


def flat_expert_views(info: ClassInfo) -> bool:
    """dbrx: the experts' weights held flat, (E * I, H), by a module inside, and read per expert
    as `self.mlp.w1.view(-1, I, H)[e]` in a loop summing with `index_add_`."""
    fwd = info.method("forward")
    if fwd is None:
        return False
    per_expert_view = m.Subscript(value=m.Call(func=m.Attribute(
        value=m.Attribute(value=m.Attribute(value=m.Name("self")) | m.Name("self")),
        attr=m.Name("view") | m.Name("reshape"))))
    return any(findall(loop, m.Call(func=m.Attribute(attr=m.Name("index_add_"))))
               and len(findall(loop, per_expert_view)) >= 2 for loop in findall(fwd, m.For()))


def _masked_per_expert_loop(info: ClassInfo, fwd: cst.FunctionDef) -> bool:
    """A loop over the experts that applies two of the module's 3-D per-expert weights, `x @
    self.w[e]` (stored (experts, in, out)), and writes each expert's rows back by a mask
    (`out[mask] = ... @ self.down[e]`, Ergo) rather than with `index_add_`."""
    three_d = {a for a, v in _init_attrs(info).items() if (s := _param_shape(v)) is not None and len(s) == 3}
    for loop in findall(fwd, m.For()):
        used = {self_attr(p.right.value) for p in findall(loop, _PER_EXPERT_MATMUL)}  # type: ignore[attr-defined]
        if len(used & three_d) >= 2:
            return True
    return False
