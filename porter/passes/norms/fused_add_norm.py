"""PT330 fused-add-norm: the rule `FusedAddNorm`; its `why` says what it rewrites and why."""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import assigned_names, find_method, findall, loop_module, names_in, param_names, self_attr
from porter.passes.base import Example, Rule

_LAYER = (
    "import torch\nfrom torch import nn\n\n\nclass Layer(nn.Module):\n    def __init__(self, config):\n"
    "        super().__init__()\n        self.attn = Attn(config)\n        self.mlp = MLP(config)\n"
    "        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)\n"
    "        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)\n\n"
    "    def forward(self, hidden_states, positions{param}):\n{body}\n\n"
    "class Model(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.layers = nn.ModuleList([Layer(config) for _ in range(config.num_hidden_layers)])\n"
    "        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)\n\n"
    "    def forward(self, hidden_states, positions):\n{loop}"
    "        return hidden_states\n"
)
_BEFORE = _LAYER.format(param="", body=(
    "        residual = hidden_states\n        hidden_states = self.input_layernorm(hidden_states)\n"
    "        hidden_states = self.attn(hidden_states, positions)\n        hidden_states = residual + hidden_states\n"
    "        residual = hidden_states\n        hidden_states = self.post_attention_layernorm(hidden_states)\n"
    "        hidden_states = self.mlp(hidden_states)\n        hidden_states = residual + hidden_states\n"
    "        return hidden_states\n"), loop=(
    "        for layer in self.layers:\n            hidden_states = layer(hidden_states, positions=positions)\n"
    "        hidden_states = self.norm(hidden_states)\n"))
_AFTER = _LAYER.format(param=", residual: torch.Tensor | None = None", body=(
    "        if residual is None:\n            residual = hidden_states\n"
    "            hidden_states = self.input_layernorm(hidden_states)\n        else:\n"
    "            hidden_states, residual = self.input_layernorm(hidden_states, residual)\n"
    "        hidden_states = self.attn(hidden_states, positions)\n"
    "        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)\n"
    "        hidden_states = self.mlp(hidden_states)\n        return hidden_states, residual\n"), loop=(
    "        residual = None\n        for layer in self.layers:\n"
    "            hidden_states, residual = layer(hidden_states, positions=positions, residual=residual)\n"
    "        hidden_states, _ = self.norm(hidden_states, residual)\n"))
# a scaled residual (Granite's `residual + h * self.residual_multiplier`) is not the engine's add: unchanged
_SCALED = _BEFORE.replace("residual + hidden_states\n", "residual + hidden_states * self.m\n")
# gemma2's sandwich: a post-norm inside each block, before its add (vLLM's gemma2 fuses it the same way)
_SANDWICH_BEFORE = _BEFORE.replace(
    "        hidden_states = self.attn(hidden_states, positions)\n",
    "        hidden_states = self.attn(hidden_states, positions)\n        hidden_states = self.post_attn(hidden_states)\n")
_SANDWICH_AFTER = _AFTER.replace(
    "        hidden_states = self.attn(hidden_states, positions)\n",
    "        hidden_states = self.attn(hidden_states, positions)\n        hidden_states = self.post_attn(hidden_states)\n")
# the model's final norm is not one taking the residual: nothing changes
_LAYER_NORM = _BEFORE.replace("        self.norm = RMSNorm(", "        self.norm = LayerNorm(")
_SEED = {"engine_symbols": {"RMSNorm"}}


@dataclass
class _Layer:
    """A decoder layer's forward cut at its residual adds: the first norm, then per block the
    statements between one norm and the next add, and the norm opening the next block."""

    hidden: str  # the forward's first argument, threaded through every block
    residual: str  # the local holding the residual stream
    doc: list[cst.BaseStatement]  # a docstring kept in front
    norms: list[str]  # the norm attribute opening each block
    segments: list[list[cst.BaseStatement]]  # each block's statements between its norm and its add
    leads: list[list[cst.EmptyLine]]  # the comments above each block after the first (on its `r = h`)


def _one(st: cst.BaseStatement, pattern: m.BaseMatcherNode) -> cst.BaseSmallStatement | None:
    if isinstance(st, cst.SimpleStatementLine) and len(st.body) == 1 and m.matches(st.body[0], pattern):
        return st.body[0]
    return None


def _copy(st: cst.BaseStatement, dst: str | None = None, src: str | None = None) -> tuple[str, str] | None:
    """`dst = src` of two names."""
    node = _one(st, m.Assign(targets=[m.AssignTarget(m.Name(dst) if dst else m.Name())], value=m.Name(src) if src else m.Name()))
    return (node.targets[0].target.value, node.value.value) if node is not None else None  # type: ignore[attr-defined]


def _normed(st: cst.BaseStatement, hidden: str, norms: set[str]) -> str | None:
    """`hidden = self.<norm>(hidden)`: the norm's attribute."""
    node = _one(st, m.Assign(targets=[m.AssignTarget(m.Name(hidden))], value=m.Call(
        func=m.Attribute(value=m.Name("self"), attr=m.Name(m.MatchIfTrue(lambda a: a in norms))),
        args=[m.Arg(m.Name(hidden), keyword=None)])))
    return node.value.func.attr.value if node is not None else None  # type: ignore[attr-defined]


def _added(st: cst.BaseStatement, hidden: str, residual: str) -> bool:
    """`hidden = residual + hidden` (either order): the plain residual add the engine's norm fuses."""
    pair = (m.Name(residual), m.Name(hidden))
    return _one(st, m.Assign(targets=[m.AssignTarget(m.Name(hidden))], value=m.BinaryOperation(
        left=pair[0], operator=m.Add(), right=pair[1]) | m.BinaryOperation(
        left=pair[1], operator=m.Add(), right=pair[0]))) is not None


def _written(sts: list[cst.BaseStatement]) -> set[str]:
    out: set[str] = set()
    for st in sts:
        for a in findall(cst.Module(body=[st]), m.Assign() | m.AugAssign() | m.AnnAssign()):
            for t in getattr(a, "targets", None) or [a]:
                out.update(assigned_names(t.target))  # type: ignore[attr-defined]
        for f in findall(cst.Module(body=[st]), m.For()):
            out.update(assigned_names(f.target))  # type: ignore[attr-defined]
    return out


def cut_layer(fn: cst.FunctionDef, norms: set[str]) -> _Layer | None:
    """The forward as pre-norm residual blocks, each `residual = h; h = norm(h); ...; h = residual + h`,
    the next block opening with `residual = h; h = norm2(h)` and the last add followed by `return h`;
    nothing but those statements reads or writes the residual, and a block's own locals are not read
    by a later one (the fused norm adds into its inputs' storage). None when it is not that."""
    params = param_names(fn)
    if len(params) < 2 or not isinstance(fn.body, cst.IndentedBlock) or fn.params.star_kwarg is not None:
        return None
    hidden = params[1]
    body = list(fn.body.body)
    doc = body[:1] if body and _one(body[0], m.Expr(m.SimpleString() | m.ConcatenatedString())) else []
    body = body[len(doc):]
    first = _copy(body[0], src=hidden) if body else None
    if first is None or first[0] in params:
        return None
    residual = first[0]
    norms_seen: list[str] = []
    segments: list[list[cst.BaseStatement]] = []
    leads: list[list[cst.EmptyLine]] = []
    i = 1
    while True:
        norm = _normed(body[i], hidden, norms) if i < len(body) else None
        if norm is None:
            return None
        norms_seen.append(norm)
        j = next((k for k in range(i + 1, len(body)) if _added(body[k], hidden, residual)), None)
        if j is None:
            return None
        segment = body[i + 1:j]
        if any(residual in names_in(st) or residual in _written([st]) for st in segment):
            return None
        segments.append(segment)
        if j + 1 < len(body) and _copy(body[j + 1], dst=residual, src=hidden):
            leads.append(list(body[j + 1].leading_lines))  # type: ignore[attr-defined]
            i = j + 2
            continue
        if j + 2 == len(body) and _one(body[j + 1], m.Return(m.Name(hidden))):
            break
        return None
    for k, seg in enumerate(segments):
        own = _written(seg) - {hidden}
        if any(own & names_in(st) for later in segments[k + 1:] for st in later):
            return None
    return _Layer(hidden, residual, doc, norms_seen, segments, leads)


def norm_attrs(cls: cst.ClassDef, engine_norms: set[str]) -> set[str]:
    """Attributes `__init__` binds only to an engine norm that takes the residual form."""
    init = find_method(cls, "__init__")
    binds: dict[str, bool] = {}
    for a in findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))])) if init else []:
        attr = self_attr(a.targets[0].target)  # type: ignore[attr-defined]
        ok = m.matches(a.value, m.Call(func=m.Name(m.MatchIfTrue(lambda n: n in engine_norms))))  # type: ignore[attr-defined]
        binds[attr] = binds.get(attr, True) and ok  # type: ignore[index]
    return {a for a, ok in binds.items() if ok}


class FusedAddNorm(Rule):
    descend_methods = frozenset()  # works on the module as a whole
    code = "PT330"
    name = "fused-add-norm"
    why = (
        "The engine's RMSNorm / GemmaRMSNorm take the residual too: `norm(x, residual)` returns "
        "`(norm(x + residual), x + residual)` in one fused kernel, and vLLM's own llama, qwen2, gemma "
        "and gemma2 thread the residual stream through the layers that way. A decoder layer whose "
        "forward is pre-norm residual blocks (found by dataflow: `r = h; h = norm(h); ...; h = r + h`, "
        "blocks chained by `r = h; h = norm2(h)`, ending `return h`; a post-norm inside a block, as "
        "gemma2's sandwich, stays inside it as in vLLM's gemma2) takes `residual` and returns "
        "`(h, residual)`; the model's loop over those layers threads it and its final norm adds it. "
        "A block with anything else between its add and the next norm (a scaled residual, a post-norm "
        "after the add), a final norm that is not the engine's, or a layer built or called elsewhere "
        "stays as it was."
    )
    examples = [Example(_BEFORE, _AFTER, seed=_SEED), Example(_SANDWICH_BEFORE, _SANDWICH_AFTER, seed=_SEED),
                Example(_SCALED, _SCALED, seed=_SEED), Example(_LAYER_NORM, _LAYER_NORM, seed=_SEED)]

    @classmethod
    def applies(cls, ctx) -> bool:
        return bool(ctx.engine_symbols & ctx.table.engine_add_norms)

    def leave_Module(self, original, updated):
        engine = {self.ctx.bound_name(s) for s in self.ctx.engine_symbols & self.ctx.table.engine_add_norms}
        classes = {st.name.value: st for st in updated.body if isinstance(st, cst.ClassDef)}
        layers: dict[str, _Layer] = {}
        for name, cls in classes.items():
            fwd = find_method(cls, "forward")
            cut = cut_layer(fwd, norm_attrs(cls, engine)) if fwd is not None else None
            if cut is not None:
                layers[name] = cut
        if not layers:
            return updated
        # a layer class is fused only with the loop that calls it: built in one list, called only there
        builds = {n: len(findall(updated, m.Call(func=m.Name(n)))) for n in layers}
        derived = {b.value.value for c in classes.values() for b in c.bases if isinstance(b.value, cst.Name)}  # type: ignore[attr-defined]
        loops: dict[str, tuple[cst.For, str]] = {}  # model class -> its loop and the layers' residual name
        for name, cls in classes.items():
            found = self._model_loop(cls, layers, builds, derived, engine, classes)
            if found is not None:
                loops[name] = found
        if not loops:
            return updated
        fused = {c for cls in loops for c in self._list_classes(classes[cls], loops[cls][0], layers, classes)}
        body = []
        for st in updated.body:
            if isinstance(st, cst.ClassDef) and st.name.value in fused:
                st = self._fuse_layer(st, layers[st.name.value])
            elif isinstance(st, cst.ClassDef) and st.name.value in loops:
                st = self._fuse_loop(st, *loops[st.name.value])
            body.append(st)
        return updated.with_changes(body=body)

    # -- the model's loop ------------------------------------------------------------------------
    def _list_classes(self, cls: cst.ClassDef, loop: cst.For, layers: dict[str, _Layer], classes) -> set[str]:
        """The file classes the list the loop walks is built of (all of them layers this rule cut)."""
        attr = loop_module(loop)[1]  # type: ignore[index]
        init = find_method(cls, "__init__")
        builds = findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self"), attr=m.Name(attr)))])) if init else []
        if len(builds) != 1:
            return set()
        value = builds[0].value  # type: ignore[attr-defined]
        if not m.matches(value, m.Call(func=m.Attribute(value=m.Name("nn"), attr=m.Name("ModuleList")) | m.Name("ModuleList"),
                                       args=[m.Arg(m.ListComp())])):
            return set()
        called = {c.func.value for c in findall(value.args[0].value.elt, m.Call(func=m.Name()))}  # type: ignore[attr-defined]
        made = called & set(classes)
        return made if made and made <= set(layers) else set()

    def _model_loop(self, cls, layers, builds, derived, engine, classes) -> tuple[cst.For, str] | None:
        fwd = find_method(cls, "forward")
        if fwd is None or not isinstance(fwd.body, cst.IndentedBlock):
            return None
        norms = norm_attrs(cls, engine)
        body = list(fwd.body.body)
        for i, st in enumerate(body):
            if not isinstance(st, cst.For) or st.orelse is not None or loop_module(st) is None:
                continue
            var = loop_module(st)[0]  # type: ignore[index]
            inner = st.body.body if isinstance(st.body, cst.IndentedBlock) else []
            call = _one(inner[0], m.Assign(targets=[m.AssignTarget(m.Name())], value=m.Call(func=m.Name(var)))) \
                if len(inner) == 1 else None
            if call is None:
                continue
            hidden = call.targets[0].target.value  # type: ignore[attr-defined]
            args = call.value.args  # type: ignore[attr-defined]
            if not args or args[0].keyword is not None or not m.matches(args[0].value, m.Name(hidden)):
                continue
            made = self._list_classes(cls, st, layers, classes)
            if not made or any(builds[c] != 1 or c in derived for c in made):
                continue
            names = {layers[c].residual for c in made}
            if len(names) != 1 or any(n in names_in(fwd.body) or n in param_names(fwd) for n in names | {"_"}):
                continue
            after = body[i + 1] if i + 1 < len(body) else None
            if after is None or _normed(after, hidden, norms) is None:
                continue
            # what the layers add into is the loop's input: nothing after the loop reads another name for it
            aliases = {x for s in body[:i] if (c := _copy(s)) and hidden in c for x in c} - {hidden}
            if any(aliases & names_in(s) for s in body[i + 1:]):
                continue
            return st, names.pop()
        return None

    def _fuse_loop(self, cls: cst.ClassDef, loop: cst.For, residual: str) -> cst.ClassDef:
        fwd = find_method(cls, "forward")
        assert fwd is not None and isinstance(fwd.body, cst.IndentedBlock)
        body: list[cst.BaseStatement] = []
        stmts = list(fwd.body.body)
        for i, st in enumerate(stmts):
            if st is loop:
                call = st.body.body[0].body[0]  # type: ignore[attr-defined]
                hidden = call.targets[0].target.value
                value = call.value.with_changes(args=[*call.value.args, cst.Arg(
                    cst.Name(residual), keyword=cst.Name(residual),
                    equal=cst.AssignEqual(whitespace_before=cst.SimpleWhitespace(""), whitespace_after=cst.SimpleWhitespace("")))])
                line = st.body.body[0].with_changes(body=[cst.Assign(
                    targets=[cst.AssignTarget(cst.parse_expression(f"{hidden}, {residual}"))], value=value)])
                body.append(cst.parse_statement(f"{residual} = None\n").with_changes(leading_lines=st.leading_lines))
                body.append(st.with_changes(leading_lines=[], body=st.body.with_changes(body=[line])))
                continue
            if i > 0 and stmts[i - 1] is loop:
                norm = st.body[0].value  # type: ignore[attr-defined]
                hidden = st.body[0].targets[0].target.value  # type: ignore[attr-defined]
                st = st.with_changes(body=[cst.Assign(
                    targets=[cst.AssignTarget(cst.parse_expression(f"{hidden}, _"))],
                    value=norm.with_changes(args=[*norm.args, cst.Arg(cst.Name(residual))]))])
            body.append(st)
        self.mark(f"{cls.name.value}.forward")
        self.ctx.fused_residual[cls.name.value] = residual
        return _replace_method(cls, fwd, fwd.with_changes(body=fwd.body.with_changes(body=body)))

    # -- the layer -------------------------------------------------------------------------------
    def _fuse_layer(self, cls: cst.ClassDef, cut: _Layer) -> cst.ClassDef:
        fwd = find_method(cls, "forward")
        assert fwd is not None and isinstance(fwd.body, cst.IndentedBlock)
        h, r = cut.hidden, cut.residual
        opening = cst.parse_statement(
            f"if {r} is None:\n    {r} = {h}\n    {h} = self.{cut.norms[0]}({h})\n"
            f"else:\n    {h}, {r} = self.{cut.norms[0]}({h}, {r})\n")
        body: list[cst.BaseStatement] = [*cut.doc, opening.with_changes(
            leading_lines=fwd.body.body[len(cut.doc)].leading_lines)]
        for k, seg in enumerate(cut.segments):
            body += seg
            if k + 1 < len(cut.segments):
                body.append(cst.parse_statement(f"{h}, {r} = self.{cut.norms[k + 1]}({h}, {r})\n").with_changes(
                    leading_lines=cut.leads[k]))
        body.append(cst.parse_statement(f"return {h}, {r}\n"))
        annotation = cst.Annotation(cst.parse_expression("torch.Tensor | None")) if self._imports_torch() else None
        param = cst.Param(cst.Name(r), annotation=annotation, default=cst.Name("None"),
                          equal=cst.AssignEqual(whitespace_before=cst.SimpleWhitespace(" " if annotation else ""),
                                                whitespace_after=cst.SimpleWhitespace(" " if annotation else "")))
        params = fwd.params
        new = fwd.with_changes(params=params.with_changes(params=[*params.params, param]),
                               body=fwd.body.with_changes(body=body))
        self.mark(f"{cls.name.value}.forward")
        return _replace_method(cls, fwd, new)

    def _imports_torch(self) -> bool:
        return self.ctx.idx.qualify("torch") == "torch" or "torch" in self.ctx.idx.imports


def _replace_method(cls: cst.ClassDef, old: cst.FunctionDef, new: cst.FunctionDef) -> cst.ClassDef:
    return cls.with_changes(body=cls.body.with_changes(body=[new if s is old else s for s in cls.body.body]))
