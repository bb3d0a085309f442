"""Phase 2 — plan: decide what the port is, as one printable dataclass.

The plan is the single input of the rewrite passes and of the templates, so the generated
model code and its `load_weights` can never disagree about fusions or names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import (
    findall, code, dotted, names_in, param_names, resolve_cross_attention, self_attr, self_call_attr,
)
from porter.analysis.dataflow import ATTN, forward_flow
from porter.analysis.grouped_qkv import grouped_split
from porter.analysis.moe import MoePlan, compact_moe, find_moe_blocks, unported_experts
from porter.analysis.index import (
    EMBEDDING_NAMES,
    LAYER_NORM_NAMES,
    LINEAR_NAMES,
    ClassInfo,
    ModelIndex,
    is_module_subclass,
    is_transposed_linear,
    table_class,
)
from porter.layout import port_architecture
from porter.rules_data import StripTable

# forward() parameters the HF cache object travels in (those of rules/hf_strip.yaml's strip_params)
CACHE_PARAMS = frozenset({"past_key_values", "past_key_value", "cache", "layer_past"})


@dataclass
class LinearPlan:
    cls: str
    attr: str
    role: str  # column | row | replicated | lm_head
    line: int


@dataclass
class AttentionPlan:
    cls: str
    q: str
    k: str
    v: str
    o: str | None
    head_dim: str
    num_heads: str
    num_kv_heads: str
    hidden_size: str
    bias: str
    scale: str
    sliding_window: str | None
    softcap: str | None
    rope: str | None  # None | "neox" | "gptj"
    rope_helper: str | None  # name of the HF function applying rotary
    line: int
    packed: bool = False  # one projection whose output HF slices into q, k, v (fused in the checkpoint)
    interleaved: bool = False  # packed per head ([h0: q k v, h1: q k v, ...]): permuted when loading
    # packed per head only when this attention attribute is false at run time (GPTBigCode: the
    # `if self.multi_query:` arm slices [q; k; v] by sizes, the other arm views per head)
    interleaved_unless: str | None = None
    # packed grouped per KV head ([kv_heads, q_per_kv + 2, head_dim], Falcon's `_split_heads` arms):
    # regrouped into [q; k; v] when loading
    grouped: bool = False
    alibi: str | None = None  # forward parameter carrying an ALiBi bias (PT150 `alibi=`): slopes in the engine's Attention
    alibi_scale: str | None = None  # the scale HF applies to scores and bias together (after the bias is added)
    # the config test under which the model builds the bias (`if self.use_alibi: alibi = build(...)`,
    # `self.use_alibi = config.alibi`): None when it always does
    alibi_when: str | None = None
    rope_theta: str | None = None  # rotary from a sinusoidal table built in the source (GPT-J): its base
    rope_dim: str | None = None  # ... and how many dims of each head it rotates
    # attention sinks: the `s_aux=` of the HF call (one learned logit per head, the engine's
    # Attention(sinks=...)); PT160 shards the parameter per TP rank
    sinks: str | None = None


@dataclass
class GateUpPlan:
    cls: str
    gate: str
    up: str
    act: str  # attribute holding the activation
    line: int


@dataclass
class PortPlan:
    model_type: str
    source: str
    causal_lm: str
    architecture: str
    base_attr: str  # causal LM attribute holding the base model ("model")
    embed_path: str  # dotted path from the causal LM to the token embedding
    lm_head: str | None
    tie_condition: str
    classes: list[str]  # file classes kept in the port, in file order
    top_classes: list[str]  # classes built directly by the causal LM (take the engine config)
    norms: dict[str, str] = field(default_factory=dict)  # HF norm class -> RMSNorm | GemmaRMSNorm
    rotary_classes: list[str] = field(default_factory=list)
    attentions: list[AttentionPlan] = field(default_factory=list)
    gate_ups: list[GateUpPlan] = field(default_factory=list)
    linears: list[LinearPlan] = field(default_factory=list)
    vocab_embeddings: list[str] = field(default_factory=list)  # "Cls.attr"
    vocab_embedding_classes: list[str] = field(default_factory=list)  # file classes deriving nn.Embedding
    stacked_params: list[tuple[str, str, str]] = field(default_factory=list)  # (fused, orig, shard)
    checkpoint_renames: list[tuple[str, str]] = field(default_factory=list)  # (regex, replacement)
    # attributes holding a linear in the transposed convention (Conv1D): weights transposed when loading
    transposed_linears: list[str] = field(default_factory=list)
    moes: list[MoePlan] = field(default_factory=list)  # router + experts blocks (porter/analysis/moe.py)
    module_renames: dict[str, str] = field(default_factory=dict)  # in-memory attr -> checkpoint attr

    def moe(self, cls: str) -> MoePlan | None:
        return next((p for p in self.moes if p.cls == cls), None)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("moes", "module_renames", "transposed_linears"):  # only where there are any (other ports' PORT.json unchanged)
            if not d[key]:
                del d[key]
        for a in d["attentions"]:
            for key in ("alibi", "alibi_scale", "alibi_when", "rope_theta", "rope_dim"):
                if a[key] is None:
                    del a[key]
            if not a["grouped"]:
                del a["grouped"]
        for att in d["attentions"]:  # (idem: only where there are sinks)
            if att.get("sinks") is None:
                att.pop("sinks", None)
        for moe in d.get("moes", []):  # the scoring only when it is not the default softmax (idem)
            if moe.get("scoring_func") == "softmax":
                del moe["scoring_func"]
            if not moe.get("transposed"):  # (idem: only where the experts are stored transposed)
                moe.pop("transposed", None)
            compact_moe(moe)
        return d

    def attention(self, cls: str) -> AttentionPlan | None:
        return next((a for a in self.attentions if a.cls == cls), None)

    def gate_up(self, cls: str) -> GateUpPlan | None:
        return next((g for g in self.gate_ups if g.cls == cls), None)

    def linear_role(self, cls: str, attr: str) -> str | None:
        for lp in self.linears:
            if lp.cls == cls and lp.attr == attr:
                return lp.role
        return None


def linear_args(call: cst.Call) -> tuple[str, str, str]:
    """(in_features, out_features, bias) of an nn.Linear call, as source text."""
    pos = [a for a in call.args if a.keyword is None]
    kw = {a.keyword.value: a.value for a in call.args if a.keyword is not None}
    if is_transposed_linear(dotted(call.func)):  # Conv1D(nf, nx): out first, always with bias
        out_f = kw.get("nf", pos[0].value if pos else None)
        in_f = kw.get("nx", pos[1].value if len(pos) > 1 else None)
        if in_f is None or out_f is None:
            raise ValueError("transposed linear without in/out features")
        return code(in_f), code(out_f), "True"
    in_f = kw.get("in_features", pos[0].value if pos else None)
    out_f = kw.get("out_features", pos[1].value if len(pos) > 1 else None)
    bias = kw.get("bias", pos[2].value if len(pos) > 2 else None)
    if in_f is None or out_f is None:
        raise ValueError("nn.Linear without in/out features")
    return code(in_f), code(out_f), code(bias) if bias is not None else "True"


def _heads(out_features: str, head_dim: str) -> str:
    node = cst.parse_expression(out_features)
    if isinstance(node, cst.BinaryOperation) and isinstance(node.operator, cst.Multiply):
        if code(node.right) == head_dim:
            return code(node.left)
        if code(node.left) == head_dim:
            return code(node.right)
    if isinstance(node, (cst.Name, cst.Attribute)):
        return f"{out_features} // {head_dim}"
    return f"({out_features}) // {head_dim}"


def _strip_layout_calls(e: cst.BaseExpression) -> cst.BaseExpression:
    """`x[..., 0, :].transpose(1, 2)` -> `x[..., 0, :]`: a head-layout change after the pick (Bloom)."""
    while isinstance(e, cst.Call) and isinstance(e.func, cst.Attribute) \
            and e.func.attr.value in ("transpose", "permute", "contiguous"):
        e = e.func.value
    return e


def per_head_split_helper(info: ClassInfo, packed: str) -> str | None:
    """`qkv = self.packed(x); q, k, v = self._split_heads(qkv)` where the method views its input as
    `(..., heads, 3, head_dim)` and returns `x[..., 0, :], x[..., 1, :], x[..., 2, :]`: q/k/v
    interleaved per head (Persimmon, Bloom). Returns the method's name."""
    fwd = info.method("forward")
    if fwd is None:
        return None
    out_names = {n.targets[0].target.value for n in findall(fwd, m.Assign(  # type: ignore[attr-defined]
        targets=[m.AssignTarget(m.Name())], value=m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(packed)))))}
    for node in findall(fwd, m.Assign(targets=[m.AssignTarget(m.Tuple())], value=m.Call(
            func=m.Attribute(value=m.Name("self"), attr=m.Name()),
            args=[m.Arg(m.Name(m.MatchIfTrue(lambda n: n in out_names)))]))):
        helper = node.value.func.attr.value  # type: ignore[attr-defined]
        meth = info.method(helper)
        if meth is None:
            continue
        views = [c for c in findall(meth, m.Call(func=m.Attribute(attr=m.Name("view"))))
                 if len(c.args) >= 3 and code(c.args[-2].value) == "3"]  # type: ignore[attr-defined]
        rets = findall(meth, m.Return(value=m.Tuple()))
        local = {n.targets[0].target.value: n.value for n in findall(meth, m.Assign(  # type: ignore[attr-defined]
            targets=[m.AssignTarget(m.Name())]))}
        picks = [[code(sl.slice) for sl in sub.slice] for r in rets for el in r.value.elements  # type: ignore[attr-defined]
                 if isinstance(sub := _strip_layout_calls(local.get(el.value.value, el.value) if isinstance(
                     el.value, cst.Name) else el.value), cst.Subscript)]
        if views and picks == [["...", "0", ":"], ["...", "1", ":"], ["...", "2", ":"]]:
            return helper
    return None


def table_activation_class(node: cst.CSTNode) -> str | None:
    """`ACT2CLS["xielu"]` -> "xielu": a transformers activation class picked by a constant key."""
    if m.matches(node, m.Subscript(value=m.Name("ACT2CLS"),
                                   slice=[m.SubscriptElement(slice=m.Index(value=m.SimpleString()))])):
        return node.slice[0].slice.value.evaluated_value  # type: ignore[attr-defined]
    return None


def engine_has_activation_class(node: cst.CSTNode) -> bool:
    """Every target has an engine class for this `ACT2CLS["key"]` (rule PT140 swaps it in)."""
    from porter.rules_data import targets

    key = table_activation_class(node)
    return key is not None and all(f"act_class_{key}" in t.symbols for t in targets().values())


def packed_split_call(st: cst.CSTNode, attr: str) -> cst.Call | None:
    """`q, k, v = self.attr(x)[.unsqueeze(..)].split(ARG, dim=...)`: the packed projection split in
    one statement; returns the split call."""
    if not m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Tuple(
            elements=[m.Element(m.Name()), m.Element(m.Name()), m.Element(m.Name())]))], value=m.Call(
                func=m.Attribute(attr=m.Name("split"))))])):
        return None
    call = st.body[0].value  # type: ignore[attr-defined]
    if not findall(call, m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(attr)))):
        return None
    return call


def query_prescale(
    fwd: cst.FunctionDef, q_attr: str, call: cst.Call
) -> tuple[cst.BinaryOperation, cst.BaseExpression, cst.BaseExpression] | None:
    """`self.q_proj(x) * self.scaling` in a forward whose attention call passes `scaling=1.0`
    (OPT): HF scales the query before the op and asks the op for no scale of its own.
    (the product, its projection call, its `self.<attr>` factor)"""
    if not any(a.keyword is not None and a.keyword.value == "scaling"
               and m.matches(a.value, m.Float("1.0") | m.Integer("1")) for a in call.args):
        return None
    for node in findall(fwd, m.BinaryOperation(operator=m.Multiply())):
        assert isinstance(node, cst.BinaryOperation)
        for proj, scale in ((node.left, node.right), (node.right, node.left)):
            if self_call_attr(proj) == q_attr and self_attr(scale) is not None:
                return node, proj, scale
    return None


def rope_guard(fwd: cst.FunctionDef, helper: str, hf_names: frozenset[str]) -> cst.If | None:
    """The `if` on an HF-only name that the rotary call sits under (`if position_embeddings is not
    None:`: the model hands NoPE layers None), else None."""
    for node in findall(fwd, m.If()):
        assert isinstance(node, cst.If)
        if names_in(node.test) & hf_names and findall(node.body, m.Call(func=m.Name(helper))):
            return node
    return None


def attention_call_names(idx: ModelIndex) -> set[str]:
    """Callables that are HF's attention op: `attention_interface`, or a module function taking
    (module, query, key, value, ...)."""
    names = {"attention_interface"}
    for fname, fn in idx.functions.items():
        ps = param_names(fn)
        if len(ps) >= 4 and ps[1].startswith("query") and ps[2].startswith("key"):
            names.add(fname)
    return names


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


def alibi_condition(idx: ModelIndex, classes: list[str], name: str) -> str | None:
    """The config test under which a kept forward builds the ALiBi bias: `if self.use_alibi: alibi =
    build(...)` with `self.use_alibi = config.alibi` in `__init__` (or `if self.config.alibi:`) gives
    "config.alibi"; None when the bias is built unconditionally."""
    for cls in classes:
        info = idx.classes[cls]
        fwd = info.method("forward")
        for node in findall(fwd, m.If(test=m.Attribute())) if fwd else []:
            builds = findall(node.body, m.Assign(targets=[m.AssignTarget(m.Name(name))], value=m.Call()))  # type: ignore[attr-defined]
            if not builds:
                continue
            test = node.test  # type: ignore[attr-defined]
            if m.matches(test, m.Attribute(value=m.Attribute(value=m.Name("self"), attr=m.Name("config")))):
                return f"config.{test.attr.value}"
            init = info.method("__init__")
            for a in findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))])) if init else []:
                if code(a.targets[0].target) == code(test) and m.matches(a.value, m.Attribute(value=m.Name("config"))):  # type: ignore[attr-defined]
                    return code(a.value)  # type: ignore[attr-defined]
    return None


class Planner:
    def __init__(self, idx: ModelIndex, table: StripTable, model_type: str, source: str) -> None:
        self.idx = idx
        self.table = table
        self.model_type = model_type
        self.source = source

    # -- discovery -------------------------------------------------------------------------
    def causal_lm(self) -> ClassInfo:
        found = [c for n, c in self.idx.classes.items() if n.endswith("ForCausalLM")]
        if not found:  # the older naming (GPT2LMHeadModel), registered as the causal LM of its type
            found = [c for n, c in self.idx.classes.items() if n.endswith("LMHeadModel")]
        if not found:
            raise self.idx.error("no *ForCausalLM class: nothing to port", construct="module")
        if len(found) > 1:
            names = ", ".join(c.name for c in found)
            raise self.idx.error(
                f"more than one causal-LM class ({names}): cannot tell which to port",
                found[1].node,
                construct=f"class {found[1].name}",
            )
        return found[0]

    def reachable(self, root: ClassInfo) -> list[str]:
        seen: list[str] = []
        todo = [root.name]
        while todo:
            name = todo.pop()
            if name in seen or name not in self.idx.classes:
                continue
            seen.append(name)
            info = self.idx.classes[name]
            todo.extend(s.ctor for s in info.submodules.values() if s.ctor in self.idx.classes)
            init = info.method("__init__")
            # a module chosen by a branch (`if moe_layer: self.mlp = Moe(c) else: self.mlp = Mlp(c)`)
            todo.extend(n for c in (findall(init, m.Call(func=m.Name())) if init else [])
                        if (n := c.func.value) in self.idx.classes)  # type: ignore[attr-defined]
            todo.extend(b for b in info.bases if b in self.idx.classes and not b.endswith("PreTrainedModel"))
        order = list(self.idx.classes)
        return sorted(seen, key=order.index)

    def is_rmsnorm(self, info: ClassInfo) -> str | None:
        fwd = info.method("forward")
        if fwd is None:
            return None
        text = code(fwd)
        if "rsqrt" not in text or "pow(2)" not in text:
            return None
        if findall(fwd, m.BinaryOperation(operator=m.Subtract())):
            return None  # mean-centred: a LayerNorm written by hand, kept as the HF class
        if findall(fwd, m.BinaryOperation(left=m.Float() | m.Integer(), operator=m.Add())):
            return "GemmaRMSNorm"
        return "RMSNorm"

    def holds_projections(self, cls: str, seen: frozenset[str] = frozenset()) -> bool:
        """A file class that builds linears (itself or through its sub-modules)."""
        info = self.idx.classes.get(cls)
        if info is None or cls in seen:
            return False
        return bool(info.linears()) or any(
            self.holds_projections(s.ctor, seen | {cls}) for s in info.submodules.values())

    def is_rotary(self, info: ClassInfo) -> bool:
        init = info.method("__init__")
        if init is None or info.method("forward") is None:
            return False
        # inverse frequencies, or a sinusoidal table it gathers sin/cos from (GPT-J in transformers 5.24;
        # in 5.19 the attention itself builds the table)
        return "inv_freq" in code(init) or (self.sinusoid_theta(info) is not None
                                            and not self.holds_projections(info.name))

    def attention_call_names(self) -> set[str]:
        return attention_call_names(self.idx)

    # -- planning --------------------------------------------------------------------------
    def build(self, partial: bool = False) -> PortPlan:
        """The plan for the file's causal LM. `partial` plans every class of a snippet (rule examples)."""
        if partial and not any(n.endswith("ForCausalLM") for n in self.idx.classes):
            return self._build(None, list(self.idx.classes), partial)
        lm = self.causal_lm()
        self.refuse_recurrent_state(lm)
        return self._build(lm, self.reachable(lm), partial)

    def stateful_flag(self, info: ClassInfo, seen: frozenset[str] = frozenset()) -> tuple[ClassInfo, cst.CSTNode] | None:
        """`_is_stateful = True` in the body of INFO or of a base of it in this file (HF's
        PreTrainedModel flag for a model that carries a recurrent state across generation steps)."""
        flag = m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name("_is_stateful"))],
                                                    value=m.Name("True"))])
        for st in info.node.body.body:
            if m.matches(st, flag):
                return info, st
        for b in info.bases:
            if b in self.idx.classes and b not in seen:
                if (found := self.stateful_flag(self.idx.classes[b], seen | {info.name})) is not None:
                    return found
        return None

    def refuse_recurrent_state(self, lm: ClassInfo) -> None:
        """A causal LM whose model is `_is_stateful` (Mamba / RNN / linear-attention layers: jamba,
        zamba2, xlstm, mamba, ...) keeps a per-sequence state from one step to the next in HF's
        cache object. The port keeps only the engine's KV cache: those layers would restart from
        nothing at every decode step (and run over all of a batch's sequences as one), so the
        port stops here. Names the first method threading the state (`cache_params`), else the flag."""
        if self.idx.identifiers and "_is_stateful" not in self.idx.identifiers:
            return
        found = self.stateful_flag(lm)
        if found is None:
            return
        holder, node = found
        construct = f"class {holder.name}: _is_stateful = True"
        for info in self.idx.classes.values():  # file order
            fn = next((f for f in info.node.body.body if isinstance(f, cst.FunctionDef)
                       and "cache_params" in param_names(f)), None)
            if fn is not None:
                node, construct = fn, f"{info.name}.{fn.name.value}(cache_params)"
                break
        raise self.idx.error(
            "recurrent state carried from one step to the next (the model is `_is_stateful`: Mamba / RNN / "
            "linear-attention layers keep a per-sequence state in HF's cache object); the port keeps no "
            "state between the engine's steps and no rule maps it to the engine's state cache",
            node, construct=construct)

    def _build(self, lm: ClassInfo | None, classes: list[str], partial: bool) -> PortPlan:
        base = None
        if lm is not None:
            lm_sub = [s for s in lm.submodules.values() if s.ctor in self.idx.classes]
            if not lm_sub:
                raise self.idx.error("causal LM builds no base model", lm.node, construct=f"class {lm.name}")
            base = lm_sub[0]
        plan = PortPlan(
            model_type=self.model_type,
            source=self.source,
            causal_lm=lm.name if lm else "",
            architecture=port_architecture(lm.name) if lm else "",
            base_attr=base.attr if base else "",
            embed_path="",
            lm_head=None,
            tie_condition="config.tie_word_embeddings",
            classes=classes,
            top_classes=[base.ctor] if base else [],
        )
        attn_names = self.attention_call_names()
        for name in classes:
            init = self.idx.classes[name].method("__init__")
            for node in findall(init, m.Assign(value=m.Call(func=m.Subscript()))) if init else []:
                func = node.value.func  # type: ignore[attr-defined]
                if self_attr(node.targets[0].target) and not table_class(self.idx, func) \
                        and not engine_has_activation_class(func):  # type: ignore[attr-defined]
                    raise self.idx.error(
                        "sub-module class chosen at run time from a table: cannot tell what to port",
                        node, construct=f"{name}.__init__: {code(node.value.func)}")  # type: ignore[attr-defined]
        for name in classes:
            info = self.idx.classes[name]
            kind = self.is_rmsnorm(info)
            if kind:
                plan.norms[name] = kind
                continue
            if self.is_rotary(info):
                plan.rotary_classes.append(name)
                continue
            self.plan_class(plan, info, attn_names, is_lm=(lm is not None and name == lm.name))
        if (rearranged := self.rearranged_rope(plan)) is not None:
            raise rearranged
        kept = [c for c in classes if c not in plan.norms and c not in plan.rotary_classes]
        # beside an attention the engine runs (with none mapped, the KV cache update is the
        # attention's own, and unmapped_attention below names what keeps it from the engine)
        if plan.attentions and (stateful := self.cache_state(plan, kept)) is not None:
            raise stateful
        plan.moes = find_moe_blocks(self.idx, classes)
        if (stray := unported_experts(self.idx, classes, plan.moes)) is not None:
            raise self.idx.error(
                "cannot port mixture of experts: per-expert weights without a router the engine's "
                "FusedMoE reproduces (softmax top-k, or top-k of sigmoids, over one projection, its indices and weights "
                "passed to the experts as returned) or experts it computes (ACT2FN(gate) * up of one chunked "
                "gate/up weight)", stray.node, construct=f"class {stray.name}",
                rule="fused-moe")
        fused = {c for p in plan.moes for c in (p.router_cls, p.experts_cls)  # become FusedMoE / GateLinear
                 if not (p.routing_function and c == p.router_cls)}  # (or a GateLinear routing as its HF self)
        plan.classes = [c for c in classes if c not in plan.norms and c not in plan.rotary_classes and c not in fused]
        if lm is not None and not plan.attentions and not partial:
            blocker = self.unmapped_attention(plan.classes)
            if blocker is not None:  # (a decoder with no attention at all, a recurrent one, is not refused here)
                raise blocker
        if lm is not None:
            plan.embed_path = self.embed_path(plan, lm)
        for a in plan.attentions:
            if a.alibi:
                a.alibi_when = alibi_condition(self.idx, plan.classes, a.alibi)
        for a in plan.attentions:
            if a.packed:
                continue  # fused in the checkpoint too: QKVParallelLinear splits it when loading
            plan.stacked_params += [("qkv_proj", a.q, "q"), ("qkv_proj", a.k, "k"), ("qkv_proj", a.v, "v")]
        for g in plan.gate_ups:
            plan.stacked_params += [("gate_up_proj", g.gate, "0"), ("gate_up_proj", g.up, "1")]
        plan.stacked_params = list(dict.fromkeys(plan.stacked_params))
        plan.transposed_linears = sorted({a for c in plan.classes for a in self.transposed_linears(self.idx.classes[c])})
        return plan

    def transposed_linears(self, info: ClassInfo) -> set[str]:
        """Attributes `__init__` binds to a transposed-convention linear (Conv1D), outside any
        cross-attention arm."""
        init = resolve_cross_attention(info.method("__init__"), self.table.cross_attention_flags)
        out = set()
        for node in findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))],
                                           value=m.Call())) if init else []:
            if is_transposed_linear(self.idx.qualify(dotted(node.value.func))):  # type: ignore[attr-defined]
                out.add(self_attr(node.targets[0].target))  # type: ignore[attr-defined]
        return out

    def rearranged_rope(self, plan: PortPlan):
        """The error for a rotary module that writes into part of its frequency table
        (`inv_freq_3d[:hw_dim] = torch.cat([inv_freq[0::2], inv_freq[1::2]])`: CohereCompass's
        pre-rotated M-RoPE): the port drops the module for the engine's get_rope, which builds the
        standard table from rope_parameters, so rotated channels would turn at other speeds."""
        for name in plan.rotary_classes:
            info = self.idx.classes[name]
            # a slice of a tensor (`t[:n] = ...`), not a dict entry (`self.rope_type[layer_type] = ...`)
            sliced = m.Subscript(slice=[m.ZeroOrMore(), m.SubscriptElement(slice=m.Slice()), m.ZeroOrMore()])
            for node in findall(info.node, m.Assign(targets=[m.AssignTarget(target=sliced)])):
                target = node.targets[0].target  # type: ignore[attr-defined]
                return self.idx.error(
                    "rotary whose frequency table is rearranged in place: the engine's get_rope builds "
                    "the standard table from rope_parameters", node,
                    construct=f"class {name}: {code(target)} = ...", rule="engine-rope")
        return None

    def cache_state(self, plan: PortPlan, classes: list[str]):
        """The error for a module with projections, outside the attentions mapped to the engine's
        Attention, that reads or writes the HF cache it is handed (`past_key_values.get_linear_cache`:
        MiniMax's lightning attention; `past_key_values.layers[i].update_index`: an indexer's key
        cache): state carried from one forward to the next, which the port would drop (the engine's
        KV cache holds only what its Attention stores), so every decode step would start afresh."""
        mapped = {a.cls for a in plan.attentions}
        # only what a decoder layer builds (the model and the causal LM read the cache's length
        # for HF's own bookkeeping: get_seq_length)
        in_layers = {n for c in classes for sub in self.idx.classes[c].submodules.values()
                     if sub.in_list and sub.ctor in self.idx.classes
                     for n in self.reachable(self.idx.classes[sub.ctor])}
        for name in classes:
            info = self.idx.classes[name]
            if name in mapped or name not in in_layers or not info.linears():
                continue
            for meth in info.node.body.body:
                if not isinstance(meth, cst.FunctionDef):
                    continue
                caches = [p for p in param_names(meth) if p in CACHE_PARAMS and p in self.table.strip_params]
                for use in (u for p in caches for u in findall(meth, m.Attribute(value=m.Name(p)))):
                    return self.idx.error(
                        "cannot port a layer that keeps its own state in the HF cache across calls "
                        "(linear / recurrent attention, an indexer's key cache): the engine's KV cache "
                        "holds only its Attention's k/v", use,
                        construct=f"{name}.{meth.name.value}: {code(use)}", rule="engine-attention")
        return None

    def unmapped_attention(self, classes: list[str]):
        """The error for a decoder whose attention no rule maps to the engine's Attention:
        names the projections of an attention function fed by something other than nn.Linear
        (GPT-2's Conv1D), else the softmax of an attention written inline (Bloom's ALiBi baddbmm,
        GPT-J's `_attn`)."""
        attn_names = self.attention_call_names()
        for name in classes:
            info = self.idx.classes[name]
            fwd = info.method("forward")
            calls = [c for c in findall(fwd, m.Call()) if dotted(c.func) in attn_names] if fwd else []  # type: ignore[attr-defined]
            if calls:
                ctors = sorted({(s.ctor or "").rsplit(".", 1)[-1] for s in info.submodules.values()
                                if s.ctor not in LINEAR_NAMES and not (s.ctor or "").startswith("torch.")
                                and s.ctor not in self.idx.classes})
                return self.idx.error(
                    "attention call whose q/k/v come from no nn.Linear: no rule maps these projections to the "
                    "engine's parallel linears", calls[0],
                    construct=f"{name}.forward: {', '.join(ctors) or 'projections not found'}", rule="fuse-qkv")
        for name in classes:
            for meth in self.idx.classes[name].node.body.body:
                if not isinstance(meth, cst.FunctionDef) or meth.name.value == "forward":
                    continue
                for call in findall(meth, m.Call()):
                    if dotted(call.func) in attn_names:  # type: ignore[attr-defined]
                        return self.idx.error(
                            "attention computed in a helper method, not in forward: no rule inlines it "
                            "into forward", call, construct=f"{name}.{meth.name.value}", rule="engine-attention")
        for name in classes:
            for meth in self.idx.classes[name].node.body.body:
                if not isinstance(meth, cst.FunctionDef):
                    continue
                # softmax(x), F.softmax(x), x.softmax(-1), and a module built on the spot: nn.Softmax(dim=-1)(x)
                softmax = m.Attribute(attr=m.Name("softmax")) | m.Name("softmax") | m.Call(
                    func=m.Attribute(attr=m.Name("Softmax")) | m.Name("Softmax"))
                for call in findall(meth, m.Call(func=softmax)):
                    return self.idx.error(
                        "attention computed inline (scores, softmax, weighted sum), not through an attention "
                        "function: no rule maps it to the engine's Attention",
                        call, construct=f"{name}.{meth.name.value}: {code(call.func)}", rule="engine-attention")
        return None

    def embed_path(self, plan: PortPlan, lm: ClassInfo) -> str:
        # Walk from the causal LM down the submodule tree to the vocab embedding.
        def walk(cls: str, path: str) -> str | None:
            info = self.idx.classes[cls]
            for attr, sub in info.submodules.items():
                if f"{cls}.{attr}" in plan.vocab_embeddings:
                    return f"{path}{attr}"
                if sub.ctor in self.idx.classes and not sub.in_list:
                    found = walk(sub.ctor, f"{path}{attr}.")
                    if found:
                        return found
            return None

        found = walk(lm.name, "")
        if not found:
            raise self.idx.error("no token embedding (nn.Embedding of config.vocab_size) found",
                                 lm.node, construct=f"class {lm.name}")
        return found

    def plan_class(self, plan: PortPlan, info: ClassInfo, attn_names: set[str], is_lm: bool) -> None:
        for attr, sub in info.submodules.items():
            first = code(sub.call.args[0].value) if sub.call.args else ""
            if "vocab_size" not in first:
                continue
            if sub.ctor in EMBEDDING_NAMES:
                plan.vocab_embeddings.append(f"{info.name}.{attr}")
            elif sub.ctor in self.idx.classes and any(
                    self.idx.qualify(b) in EMBEDDING_NAMES for b in self.idx.classes[sub.ctor].bases):
                # a scaled word embedding (nn.Embedding subclass) becomes a VocabParallelEmbedding subclass
                plan.vocab_embeddings.append(f"{info.name}.{attr}")
                if sub.ctor not in plan.vocab_embedding_classes:
                    plan.vocab_embedding_classes.append(sub.ctor)
        linears = info.linears()
        if not linears:
            return
        if is_lm:
            for attr, sub in linears.items():
                plan.lm_head = attr
                plan.linears.append(LinearPlan(info.name, attr, "lm_head", sub.line))
            return
        fwd = info.method("forward")
        if fwd is None:
            return

        def is_attn_call(call: cst.Call) -> bool:
            return dotted(call.func) in attn_names

        opaque = {a for a, sub in info.submodules.items() if self.holds_projections(sub.ctor)}
        flow = forward_flow(fwd, set(info.submodules), is_attn_call, self.table.strip_params, set(linears), opaque)
        lin = set(linears)
        roles: dict[str, str] = {}
        if flow.attention_calls:
            self.refuse_unmapped_attention(info, fwd, flow, lin | opaque)
            call, per_arg = flow.attention_calls[0]
            qkv = []
            for origins in per_arg[1:4]:
                src = sorted(origins & lin)
                if len(src) != 1:
                    raise self.idx.error(
                        "cannot port attention: q/k/v projections not found",
                        call,
                        construct=f"{info.name}.forward",
                        rule="fuse-qkv",
                    )
                qkv.append(src[0])
            packed = len(set(qkv)) == 1
            interleaved = packed and self.chunked_per_head(info, qkv[0])
            grouped = None
            if interleaved:
                _, out_f, _ = linear_args(info.submodules[qkv[0]].call)
                hd_attr = "self.head_dim" if "head_dim" in self._init_attrs(info) else "self.head_size"
                node = cst.parse_expression(out_f)
                per = code(node.right) if isinstance(node, cst.BinaryOperation) and isinstance(
                    node.operator, cst.Multiply) and code(node.left) == "3" else f"({out_f}) // 3"
                heads = _heads(per, hd_attr)
                sizes = (heads, heads)
            elif packed and (grouped := self.grouped_sizes(info, qkv[0])) is not None:
                sizes = grouped
            elif packed:
                sizes = self.packed_qkv_sizes(info, qkv[0])
                if sizes is None:
                    raise self.idx.error("cannot port attention: one q/k/v projection, but its output "
                                         "is not sliced into q, k, v by head counts",
                                         call, construct=f"{info.name}.forward", rule="fuse-qkv")
            elif len(set(qkv)) != 3:
                raise self.idx.error("cannot port attention: q/k/v are not three projections",
                                     call, construct=f"{info.name}.forward", rule="fuse-qkv")
            o = next((a for a in sorted(lin) if ATTN in flow.module_inputs.get(a, set())), None)
            ap = self.attention_plan(info, call, qkv, o, flow)
            if packed:
                ap.packed = True
                ap.interleaved = bool(interleaved)
                ap.grouped = not interleaved and grouped is not None
                if not interleaved:
                    ap.interleaved_unless = self.per_head_unless(info, qkv[0])
                ap.num_heads, ap.num_kv_heads = sizes  # type: ignore[misc]
            plan.attentions.append(ap)
            for a in qkv:
                roles[a] = "qkv"
            if o:
                roles[o] = "row"
        for attr in sorted(lin - set(roles)):
            if flow.module_inputs.get(attr, set()) & (lin | {ATTN}):
                roles[attr] = "row"
        for attr in sorted(lin - set(roles)):
            feeds_row = any(attr in flow.module_inputs.get(r, set()) for r, k in roles.items() if k == "row")
            roles[attr] = "column" if feeds_row else "replicated"
            if feeds_row and (n := self.merged_outputs(fwd, attr)):
                roles[attr] = f"merged:{n}"
        self.refuse_sharded_norm(info, flow, roles)
        for attr, role in roles.items():
            if role != "qkv":
                plan.linears.append(LinearPlan(info.name, attr, role, linears[attr].line))
        gu = self.gate_up_pattern(info, fwd, roles)
        if gu:
            plan.gate_ups.append(gu)

    def refuse_unmapped_attention(self, info: ClassInfo, fwd: cst.FunctionDef, flow, projections: set[str]) -> None:
        """Attention that the engine's one `Attention` op per layer (q, k, v in; a causal or
        windowed mask of its own; one cached k/v per token) cannot express, so that PT021 would
        port it wrong: a mask computed from the layer's own projections (Doge's dynamic mask: an
        input-dependent bias on the scores), and two attention calls run one after the other
        (DiffLlama's differential attention: the same q/k against two values)."""
        for (call, _), mask in zip(flow.attention_calls, flow.attention_masks):
            if mask & projections:
                pos = [a.value for a in call.args if a.keyword is None and not a.star]
                arg = pos[4] if len(pos) > 4 else next(
                    a.value for a in call.args if a.keyword is not None and a.keyword.value == "attention_mask")
                raise self.idx.error(
                    "attention mask computed from the layer's own projections (an input-dependent bias on the "
                    "scores): the engine's Attention takes no mask; no rule maps it", call,
                    construct=f"{info.name}.forward: attention_mask={code(arg)} from "
                              f"{', '.join(sorted(mask & projections))}", rule="engine-attention")
        names = self.attention_call_names()
        for block in findall(fwd, m.IndentedBlock()):
            calls = [c for st in block.body if isinstance(st, cst.SimpleStatementLine)  # type: ignore[attr-defined]
                     for c in findall(st, m.Call()) if dotted(c.func) in names]  # type: ignore[attr-defined]
            if len(calls) > 1:
                raise self.idx.error(
                    "two attention calls one after the other in one forward (the layer attends twice): the "
                    "engine's Attention runs once per layer and caches one key/value per token; no rule maps it",
                    calls[1], construct=f"{info.name}.forward: {code(calls[1].func)}", rule="engine-attention")

    def refuse_sharded_norm(self, info: ClassInfo, flow, roles: dict[str, str]) -> None:
        """A norm over a width that tensor parallelism splits: the attention output before its
        output projection, or a column-parallel projection's output (an MLP's intermediate) before
        the row-parallel one (BitNet's attn_sub_norm / ffn_sub_norm). Each rank would normalise its
        own part with its own statistics; no rule gathers the width (PT120 does it for q/k norms
        only). A norm sized by the head (`Norm(head_dim)`, applied per head) sees whole heads."""
        sharded = {a for a, r in roles.items() if r == "column" or r.startswith("merged:")}
        for attr, sub in info.submodules.items():
            if "norm" not in (sub.ctor or "").rsplit(".", 1)[-1].lower() or not sub.call.args:
                continue
            width = code(sub.call.args[0].value)
            if "head_dim" in width or "head_size" in width:
                continue
            fed = flow.module_inputs.get(attr, set())
            src = sorted(fed & sharded) or (["the attention output"] if ATTN in fed else [])
            if src:
                raise self.idx.error(
                    "norm over a width that tensor parallelism splits (the attention output before its "
                    "output projection, or a column-parallel projection's output): each rank would normalise "
                    "its own part; no rule gathers it", sub.call,
                    construct=f"{info.name}.{attr}: {code(sub.call.func)}({width}) over {', '.join(src)}",
                    rule="tp-linears")

    def _locals(self, fwd: cst.FunctionDef) -> dict[str, cst.BaseExpression]:
        out: dict[str, cst.BaseExpression] = {}
        for node in findall(fwd, m.Assign(targets=[m.AssignTarget(m.Name())])):
            out.setdefault(node.targets[0].target.value, node.value)  # type: ignore[attr-defined]  # first binding
        return out

    def packed_qkv_sizes(self, info: ClassInfo, attr: str) -> tuple[str, str] | None:
        """Heads and KV heads of a packed q/k/v projection, read from how forward slices it.

        `qkv = self.qkv_proj(x); q = qkv[..., :Q]; k = qkv[..., Q : Q + K]; v = qkv[..., Q + K :]`
        with Q = heads * head_dim and K = kv_heads * head_dim.
        """
        fwd = info.method("forward")
        local = self._locals(fwd)
        out_name = next((n for n, v in local.items() if m.matches(v, m.Call(
            func=m.Attribute(value=m.Name("self"), attr=m.Name(attr))))), None)
        if out_name is None:
            return self.split_qkv_sizes(info, attr)

        def resolve(e: cst.BaseExpression) -> str:
            return code(local[e.value]) if isinstance(e, cst.Name) and e.value in local else code(e)

        slices = []
        for node in findall(fwd, m.Subscript(value=m.Name(out_name))):
            sl = node.slice[-1].slice  # type: ignore[attr-defined]
            if isinstance(sl, cst.Slice):
                slices.append(sl)
        first = next((s_ for s_ in slices if s_.lower is None and s_.upper is not None), None)
        mid = next((s_ for s_ in slices if s_.lower is not None and s_.upper is not None), None)
        if first is None or mid is None:
            return self.split_qkv_sizes(info, attr)
        q_size = resolve(first.upper)
        upper = mid.upper
        if not (isinstance(upper, cst.BinaryOperation) and isinstance(upper.operator, cst.Add)):
            return None
        kv_size = code(upper.right)
        return _heads(q_size, "self.head_dim"), _heads(kv_size, "self.head_dim")

    def grouped_sizes(self, info: ClassInfo, attr: str) -> tuple[str, str] | None:
        """Heads and KV heads of a packed projection split by a helper grouped per KV head
        (porter/analysis/grouped_qkv.py): the KV heads from its width, H + 2 * KV heads of head_dim."""
        hd = "self.head_dim" if "head_dim" in self._init_attrs(info) else "self.head_size"
        split = grouped_split(info, attr, hd)
        if split is None:
            return None
        _, out_f, _ = linear_args(info.submodules[attr].call)
        out = out_f if isinstance(cst.parse_expression(out_f), (cst.Name, cst.Attribute)) else f"({out_f})"
        return split.num_heads, f"({out} // {hd} - {split.num_heads}) // 2"

    def split_qkv_sizes(self, info: ClassInfo, attr: str) -> tuple[str, str] | None:
        """`q, k, v = self.c_attn(x).split((Q, K, K), dim=-1)` (or a list of the three sizes), with
        Q = heads * head_dim and K = kv_heads * head_dim: heads and KV heads."""
        fwd = resolve_cross_attention(info.method("forward"), self.table.cross_attention_flags)
        for st in findall(fwd, m.SimpleStatementLine()):
            call = packed_split_call(st, attr)
            if call is None or not call.args:
                continue
            sizes = call.args[0].value
            hd = "self.head_dim" if "head_dim" in self._init_attrs(info) else "self.head_size"
            if isinstance(sizes, (cst.Tuple, cst.List)) and len(sizes.elements) == 3:
                q, k, v = (code(e.value) for e in sizes.elements)
                if k == v:
                    return _heads(q, hd), _heads(k, hd)
            elif isinstance(sizes, (cst.Name, cst.Attribute)):  # `.split(self.split_size)` into three equal parts
                return _heads(code(sizes), hd), _heads(code(sizes), hd)
        return None

    def per_head_unless(self, info: ClassInfo, attr: str) -> str | None:
        """`if self.flag: q, k, v = <split by sizes> else: q, k, v = self.attr(x).view(..., heads,
        3 * head_dim)...split(...)`: the packed weight is per head interleaved unless `self.flag`."""
        fwd = resolve_cross_attention(info.method("forward"), self.table.cross_attention_flags)
        for node in findall(fwd, m.If(test=m.Attribute(value=m.Name("self"), attr=m.Name()))):
            orelse = node.orelse  # type: ignore[attr-defined]
            if orelse is None or isinstance(orelse, cst.If):
                continue
            body_split = [c for st in node.body.body if (c := packed_split_call(st, attr)) is not None]  # type: ignore[attr-defined]
            else_split = [c for st in orelse.body.body if (c := packed_split_call(st, attr)) is not None]
            if not (body_split and else_split):
                continue
            views = findall(else_split[0], m.Call(func=m.Attribute(attr=m.Name("view"))))
            if any(findall(c.args[-1].value, m.BinaryOperation(operator=m.Multiply(), left=m.Integer("3")))  # type: ignore[attr-defined]
                   for c in views if c.args):  # type: ignore[attr-defined]
                return node.test.attr.value  # type: ignore[attr-defined]
        return None

    def chunked_per_head(self, info: ClassInfo, attr: str) -> bool:
        """`qkv = self.proj(x).view(..., -1, 3 * head); q, k, v = qkv.chunk(3, dim=-1)`: q/k/v
        interleaved per head in the projection (GPT-NeoX layout)."""
        fwd = info.method("forward")
        local = self._locals(fwd)
        out_name = next((n for n, v in local.items() if findall(v, m.Call(
            func=m.Attribute(value=m.Name("self"), attr=m.Name(attr))))), None)
        if out_name is None:
            return False
        if findall(fwd, m.Call(func=m.Attribute(value=m.Name(out_name), attr=m.Name("chunk")),
                               args=[m.Arg(m.Integer("3")), m.ZeroOrMore()])):
            return True
        return per_head_split_helper(info, attr) is not None

    def merged_outputs(self, fwd: cst.FunctionDef, attr: str) -> int | None:
        """`y = self.proj(x); a, b = y.chunk(2, dim=-1)`, or `a, b = self.proj(x).chunk(2, dim=-1)`
        (ModernBERT's Wi): a column projection packing 2 outputs."""
        for node in findall(fwd, m.Call(func=m.Attribute(value=m.Call(
                func=m.Attribute(value=m.Name("self"), attr=m.Name(attr))), attr=m.Name("chunk")))):
            args = node.args  # type: ignore[attr-defined]
            if args and isinstance(args[0].value, cst.Integer):
                return int(args[0].value.value)
        local = self._locals(fwd)
        out_name = next((n for n, v in local.items() if m.matches(v, m.Call(
            func=m.Attribute(value=m.Name("self"), attr=m.Name(attr))))), None)
        if out_name is None:
            return None
        for node in findall(fwd, m.Call(func=m.Attribute(value=m.Name(out_name), attr=m.Name("chunk")))):
            args = node.args  # type: ignore[attr-defined]
            if args and isinstance(args[0].value, cst.Integer):
                return int(args[0].value.value)
        return None

    def gate_up_pattern(self, info: ClassInfo, fwd: cst.FunctionDef, roles: dict[str, str]) -> GateUpPlan | None:
        for node in findall(fwd, m.BinaryOperation(operator=m.Multiply())):
            assert isinstance(node, cst.BinaryOperation)
            for act_side, up_side in ((node.left, node.right), (node.right, node.left)):
                if not (isinstance(act_side, cst.Call) and len(act_side.args) == 1):
                    continue
                act = self_call_attr(act_side)
                gate = self_call_attr(act_side.args[0].value)
                up = self_call_attr(up_side)
                if not (act and gate and up) or roles.get(gate) != "column" or roles.get(up) != "column":
                    continue
                if code(act_side.args[0].value.args[0].value) != code(up_side.args[0].value):  # type: ignore[union-attr]
                    continue
                act_sub = info.submodules.get(act)
                if act_sub is None and act not in self._init_attrs(info):
                    continue
                return GateUpPlan(info.name, gate, up, act, info.line)
        return None

    def _init_attrs(self, info: ClassInfo) -> dict[str, cst.BaseExpression]:
        out: dict[str, cst.BaseExpression] = {}
        init = info.method("__init__")
        if init is None:
            return out
        for node in findall(init, m.Assign(targets=[m.AssignTarget(target=m.Attribute(value=m.Name("self")))])):
            assert isinstance(node, cst.Assign)
            out[self_attr(node.targets[0].target)] = node.value  # type: ignore[index]
        return out

    def attention_plan(self, info: ClassInfo, call: cst.Call, qkv: list[str], o: str | None, flow) -> AttentionPlan:
        attrs = self._init_attrs(info)
        head_attr = next((a for a in ("head_dim", "head_size") if a in attrs), None)
        if head_attr is None:
            raise self.idx.error("attention has no per-head size (self.head_dim / self.head_size)", info.node,
                                 construct=f"class {info.name}", rule="fuse-qkv")
        hd = f"self.{head_attr}"
        q_in, q_out, bias = linear_args(info.submodules[qkv[0]].call)
        _, k_out, _ = linear_args(info.submodules[qkv[1]].call)
        kw = {a.keyword.value: code(a.value) for a in call.args if a.keyword is not None}
        rope_helper = None
        fwd = info.method("forward")
        self.refuse_reused_attention(info, fwd)
        # PT029 folds the product into the op (one projection per tensor only: a packed one's
        # product would scale k and v too)
        if len(set(qkv)) == 3 and (pre := query_prescale(fwd, qkv[0], call)) is not None:
            kw["scaling"] = code(pre[2])
        for c in findall(fwd, m.Call(func=m.Name())):
            fname = c.func.value  # type: ignore[union-attr]
            if fname in self.idx.functions and "rotary" in code(self.idx.functions[fname]).lower() \
                    and fname not in self.attention_call_names():
                rope_helper = fname
        rope = None
        rope_theta = rope_dim = None
        if rope_helper and len(param_names(self.idx.functions[rope_helper])) < 4 and \
                (sinusoid := self.sinusoidal_rope(info, rope_helper)) is not None:
            rope_theta, rope_dim = sinusoid
        elif rope_helper and len(param_names(self.idx.functions[rope_helper])) < 4:
            call = next(c for c in findall(fwd, m.Call(func=m.Name(rope_helper))))
            raise self.idx.error(
                "rotary applied one tensor per call (q and k rotated separately, cos/sin from a "
                "sinusoidal buffer): no rule maps it to the engine's get_rope", call,
                construct=f"{info.name}.forward: {rope_helper}", rule="engine-rope")
        if rope_helper and (guard := rope_guard(fwd, rope_helper, self.table.strip_params)) is not None:
            # the test goes with the HF plumbing (PT011 drops the whole block): no layer would rotate
            raise self.idx.error(
                "rotary applied only under a test of HF-only plumbing (the model hands its NoPE layers "
                "no cos/sin): no rule maps a per-layer choice of rotary, and dropping the test drops the "
                "rotary from every layer", guard,
                construct=f"{info.name}.forward: if {code(guard.test)}", rule="engine-rope")
        if rope_helper:
            rope = "neox"
            helper_text = code(self.idx.functions[rope_helper])
            rot = self.idx.functions.get("rotate_half")
            called = [self.idx.functions[c.func.value] for c in findall(self.idx.functions[rope_helper], m.Call(  # type: ignore[attr-defined]
                func=m.Name())) if c.func.value in self.idx.functions]  # type: ignore[attr-defined]
            if "::2" in helper_text or (rot is not None and "::2" in code(rot)) or any("::2" in code(f) for f in called):
                rope = "gptj"
            if rope == "neox" and rot is not None:
                # the engine rotates the halves as (-x2, x1); a helper returning (x2, -x1) turns the
                # other way, which get_rope cannot express
                for cat in findall(rot, m.Call(func=m.Attribute(attr=m.Name("cat")), args=[
                        m.Arg(value=m.Tuple(elements=[m.Element(), m.Element()])), m.ZeroOrMore()])):
                    first, second = (e.value for e in cat.args[0].value.elements)  # type: ignore[attr-defined]
                    if m.matches(second, m.UnaryOperation(operator=m.Minus())) and not m.matches(
                            first, m.UnaryOperation(operator=m.Minus())):
                        raise self.idx.error(
                            "rotary that turns the other way (rotate_half returns cat(x2, -x1); the "
                            "engine's get_rope rotates cat(-x2, x1)): no rule maps it", cat,
                            construct=f"rotate_half: {code(cat)}", rule="engine-rope")
        init_params = param_names(info.method("__init__"))
        if rope and "config" not in init_params:
            raise self.idx.error("rotary attention without a config argument", info.node,
                                 construct=f"class {info.name}", rule="engine-rope")
        return AttentionPlan(
            cls=info.name,
            q=qkv[0],
            k=qkv[1],
            v=qkv[2],
            o=o,
            head_dim=hd,
            num_heads=_heads(q_out, hd),
            num_kv_heads=_heads(k_out, hd),
            hidden_size=q_in,
            bias=bias,
            scale=kw.get("scaling", f"{hd}**-0.5"),
            sliding_window=kw.get("sliding_window"),
            softcap=kw.get("softcap"),
            sinks=kw.get("s_aux"),
            rope=rope,
            rope_helper=rope_helper,
            line=info.line,
            alibi=kw.get("alibi"),
            alibi_scale=kw.get("alibi_scale"),
            rope_theta=rope_theta,
            rope_dim=rope_dim,
        )

    def refuse_reused_attention(self, info: ClassInfo, fwd: cst.FunctionDef) -> None:
        """`past_key_values.update(k, v, self.layer_idx + cycle_offset)` (HRM-text): the cache slot
        is computed, one attention module runs several times per token (a recurrence over the same
        stack) and writes a slot for each run. The engine's Attention owns one KV cache per module,
        so every run after the first would overwrite the cache the others read at decode time."""
        for call in findall(fwd, m.Call(func=m.Attribute(attr=m.Name("update")))):
            pos = [a.value for a in call.args if a.keyword is None]  # type: ignore[attr-defined]
            slot = pos[2] if len(pos) >= 3 else next(
                (a.value for a in call.args if a.keyword is not None and a.keyword.value == "layer_idx"), None)  # type: ignore[attr-defined]
            if isinstance(slot, cst.BinaryOperation):
                raise self.idx.error(
                    "one attention module, several KV-cache slots (its cache index is computed: the module runs "
                    "more than once per token); the engine's Attention keeps one KV cache per module, and "
                    "each run would overwrite the others'", call,
                    construct=f"{info.name}.forward: {code(call)}", rule="engine-attention")

    def sinusoid_theta(self, info: ClassInfo) -> str | None:
        """The base of a sinusoidal rotary table `__init__` builds (`self.t = nn.Buffer(make(max_pos, dim))`
        where make computes `THETA ** (torch.arange(0, dim, 2) / dim)` and a `.sin`)."""
        init = info.method("__init__")
        for node in findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))],
                                           value=m.Call())) if init else []:
            for c in findall(node.value, m.Call(func=m.Name())):  # type: ignore[attr-defined]
                fn = self.idx.functions.get(c.func.value)  # type: ignore[attr-defined]
                pows = findall(fn, m.BinaryOperation(left=m.Integer() | m.Float(), operator=m.Power())) if fn else []
                if fn is not None and pows and findall(fn, m.Call(func=m.Attribute(attr=m.Name("sin")))):
                    return code(pows[0].left)  # type: ignore[attr-defined]
        return None

    def sinusoidal_rope(self, info: ClassInfo, helper: str) -> tuple[str, str] | None:
        """(theta, rotary dims) of a rotary applied one tensor per call (`k_rot = helper(k_rot, sin, cos)`)
        from a sinusoidal table built in `__init__` (`self.embed_positions = nn.Buffer(make_table(max_pos,
        dim))`, where make_table computes `1.0 / (THETA ** (torch.arange(0, dim, 2) / dim))`).
        The rotary dims: the bound of the slice the helper's input is cut with (`key[..., : self.rotary_dim]`),
        `or` the head size when an `if X is not None` chooses between the slice and the whole head."""
        fwd = info.method("forward")
        # the table: built by this attention, or by the rotary module that hands it sin/cos (transformers 5.24)
        theta = self.sinusoid_theta(info) or next(
            (t for c in self.idx.classes.values() if (t := self.sinusoid_theta(c))), None)
        if theta is None or fwd is None:
            return None
        rotated = {code(c.args[0].value) for c in findall(fwd, m.Call(func=m.Name(helper)))}  # type: ignore[attr-defined]
        local = self._locals(fwd)
        dims = None
        for name in sorted(rotated):
            value = local.get(name)
            if isinstance(value, cst.Subscript) and isinstance(sl := value.slice[-1].slice, cst.Slice) \
                    and sl.lower is None and sl.upper is not None:
                dims = code(sl.upper)
        hd = "self.head_dim" if "head_dim" in self._init_attrs(info) else "self.head_size"
        if dims is None:
            return theta, hd
        guarded = findall(fwd, m.If(test=m.Comparison(left=m.MatchIfTrue(lambda e: code(e) == dims),
                                                       comparisons=[m.ComparisonTarget(m.IsNot(), m.Name("None"))])))
        return theta, f"{dims} or {hd}" if guarded else dims


def build_plan(idx: ModelIndex, table: StripTable, model_type: str, source: str,
               partial: bool = False) -> PortPlan:
    return Planner(idx, table, model_type, source).build(partial=partial)


__all__ = ["PortPlan", "build_plan", "LAYER_NORM_NAMES", "LINEAR_NAMES", "is_module_subclass"]
