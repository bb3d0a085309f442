"""PT320 pipeline-stages: the rule `PipelineStages`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, find_method, names_in, param_names
from porter.passes.base import Example, Rule
from porter.passes.plumbing._stages import Stages, analyse, loop_list, width_keeping

_CLASSES = (
    "from torch import nn\n\n\nclass AModel(nn.Module):\n"
    "    def __init__(self, config, prefix: str = ''):\n        super().__init__()\n"
    "{init}\n"
    "    def forward(self, input_ids=None, positions=None, inputs_embeds=None{param}):\n{forward}\n\n"
    "class AForCausalLM(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.model = AModel(config)\n"
    "        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)\n"
)
_INIT = (
    "        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)\n"
    "        self.layers = nn.ModuleList([Layer(config, i, prefix=f\"{prefix}.layers.{i}\") "
    "for i in range(config.num_hidden_layers)])\n"
    "        self.norm = nn.LayerNorm(config.hidden_size)\n"
)
_INIT_PP = (
    "        if get_pp_group().is_first_rank or (config.tie_word_embeddings and get_pp_group().is_last_rank):\n"
    "            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)\n"
    "        else:\n            self.embed_tokens = PPMissingLayer()\n"
    "        self.start_layer, self.end_layer, self.layers = make_layers(config.num_hidden_layers, "
    "lambda prefix: Layer(config, extract_layer_index(prefix), prefix=prefix), prefix=f\"{prefix}.layers\")\n"
    "        if get_pp_group().is_last_rank:\n            self.norm = nn.LayerNorm(config.hidden_size)\n"
    "        else:\n            self.norm = PPMissingLayer()\n"
    "        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory("
    "['hidden_states'], config.hidden_size)\n"
)
_FORWARD = (
    "        if inputs_embeds is None:\n            inputs_embeds = self.embed_tokens(input_ids)\n"
    "        hidden_states = inputs_embeds\n"
    "        for i, layer in enumerate(self.layers[: self.config.num_hidden_layers]):\n"
    "            hidden_states = layer(hidden_states, positions=positions)\n"
    "        return self.norm(hidden_states)\n"
)
_FORWARD_PP = (
    "        if get_pp_group().is_first_rank:\n"
    "            if inputs_embeds is None:\n                inputs_embeds = self.embed_tokens(input_ids)\n"
    "            hidden_states = inputs_embeds\n"
    "        else:\n            hidden_states = intermediate_tensors['hidden_states']\n"
    "        for i, layer in enumerate(islice(self.layers, self.start_layer, self.end_layer), start=self.start_layer):\n"
    "            hidden_states = layer(hidden_states, positions=positions)\n"
    "        if not get_pp_group().is_last_rank:\n"
    "            return IntermediateTensors({'hidden_states': hidden_states})\n"
    "        return self.norm(hidden_states)\n"
)
_PARAM = ", intermediate_tensors: IntermediateTensors | None = None"
# a loop that also hands a residual on, started as None (not a tensor of the embedding's width)
_RESIDUAL = (
    "        hidden_states = self.embed_tokens(input_ids)\n        residual = None\n"
    "        for layer in self.layers:\n"
    "            hidden_states, residual = layer(hidden_states, residual)\n"
    "        return self.norm(hidden_states + residual)\n"
)
# the residual PT330 threads through the loop (None into the first layer): the first stage starts it
_FUSED = (
    "        if inputs_embeds is None:\n            inputs_embeds = self.embed_tokens(input_ids)\n"
    "        hidden_states = inputs_embeds\n        residual = None\n"
    "        for layer in self.layers:\n"
    "            hidden_states, residual = layer(hidden_states, positions=positions, residual=residual)\n"
    "        hidden_states, _ = self.norm(hidden_states, residual)\n        return hidden_states\n"
)
_INIT_FUSED = _INIT_PP.replace("['hidden_states']", "['hidden_states', 'residual']")
_FUSED_PP = (
    "        if get_pp_group().is_first_rank:\n"
    "            if inputs_embeds is None:\n                inputs_embeds = self.embed_tokens(input_ids)\n"
    "            hidden_states = inputs_embeds\n            residual = None\n"
    "        else:\n            hidden_states = intermediate_tensors['hidden_states']\n"
    "            residual = intermediate_tensors['residual']\n"
    "        for layer in islice(self.layers, self.start_layer, self.end_layer):\n"
    "            hidden_states, residual = layer(hidden_states, positions=positions, residual=residual)\n"
    "        if not get_pp_group().is_last_rank:\n"
    "            return IntermediateTensors({'hidden_states': hidden_states, 'residual': residual})\n"
    "        hidden_states, _ = self.norm(hidden_states, residual)\n        return hidden_states\n"
)

# a norm over the embedding before the loop (BLOOM's word_embeddings_layernorm): of its input's width
_NORM_LINE = "        self.embed_norm = nn.LayerNorm(config.hidden_size)\n"
_INIT_NORM = _INIT.replace("        self.layers", _NORM_LINE + "        self.layers", 1)
_INIT_NORM_PP = _INIT_PP.replace("        self.start_layer", _NORM_LINE + "        self.start_layer", 1)
_NORMED = "        hidden_states = self.embed_norm(inputs_embeds)\n"
_FORWARD_NORM = _FORWARD.replace("        hidden_states = inputs_embeds\n", _NORMED)
_FORWARD_NORM_PP = _FORWARD_PP.replace("            hidden_states = inputs_embeds\n", "    " + _NORMED)


class _ConfigField(cst.CSTTransformer):
    """Each `config.X` / `self.config.X` as `config.<the field X names>` (the config's attribute_map)."""

    def __init__(self, aliases: dict[str, str]) -> None:
        super().__init__()
        self.aliases = aliases

    def leave_Attribute(self, original, updated):
        if m.matches(updated.value, m.Name("config") | m.Attribute(m.Name("self"), m.Name("config"))):
            name = updated.attr.value
            return cst.Attribute(value=cst.Name("config"), attr=cst.Name(self.aliases.get(name, name)))
        return updated


def _config_field(text: str, aliases: dict[str, str]) -> str:
    """An expression with each config read as the field it names (DBRX's num_hidden_layers is n_layers)."""
    return code(cst.parse_expression(text).visit(_ConfigField(aliases)))


def _assigns(st: cst.BaseStatement, attr: str) -> bool:
    return m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(
        m.Attribute(value=m.Name("self"), attr=m.Name(attr)))])]))


class _LayerIndex(cst.CSTTransformer):
    """The layer's build with its index read from the prefix make_layers hands it."""

    def __init__(self, var: str, index: cst.BaseExpression) -> None:
        super().__init__()
        self.var, self.index = var, index

    def leave_Name(self, original, updated):
        return self.index if updated.value == self.var else updated

    def leave_Arg(self, original, updated):
        if original.keyword is not None and original.keyword.value == "prefix":
            return updated.with_changes(value=cst.Name("prefix"), keyword=original.keyword)
        return updated.with_changes(keyword=original.keyword)

    def leave_Attribute(self, original, updated):
        return updated.with_changes(attr=original.attr)


class PipelineStages(Rule):
    descend_methods = frozenset()
    code = "PT320"
    name = "pipeline-stages"
    why = (
        "vLLM runs a model in pipeline stages (pipeline_parallel_size > 1) when its base model builds "
        "only its own stage: the token embedding on the first rank (and on the last where the head is "
        "tied to it), its share of the layers through `make_layers` (start_layer, end_layer; the other "
        "entries PPMissingLayer), the modules after the loop (the final norm) on the last rank; forward "
        "runs the layers between start_layer and end_layer, takes what the loop carries from "
        "`intermediate_tensors` on a later stage and hands it on as IntermediateTensors on an earlier "
        "one, as vLLM's llama.py does. What crosses the boundary is read by dataflow: every tensor the "
        "loop carries from one layer to the next, and every embedding-derived tensor the loop or what "
        "follows reads, each shown to have the embedding's width, through sums, casts and the model's "
        "norms (the engine's receiving buffers, `make_empty_intermediate_tensors`, have that width). Where that cannot be shown (a carried "
        "value that starts as None, a tuple from a layer, the layer list read elsewhere) the base "
        "model is left as it is and PT321 declares no SupportsPP: the engine refuses PP > 1. The "
        "residual PT330 threads is the exception to the first: a sum of the hidden stream (of its width), "
        "started as None by the first stage and handed on beside it, as in vLLM's llama."
    )
    examples = [
        Example(_CLASSES.format(init=_INIT, forward=_FORWARD, param=""),
                _CLASSES.format(init=_INIT_PP, forward=_FORWARD_PP, param=_PARAM)),
        Example(_CLASSES.format(init=_INIT, forward=_RESIDUAL, param=""),
                _CLASSES.format(init=_INIT, forward=_RESIDUAL, param="")),
        Example(_CLASSES.format(init=_INIT, forward=_FUSED, param=""),
                _CLASSES.format(init=_INIT_FUSED, forward=_FUSED_PP, param=_PARAM),
                seed={"fused_residual": {"AModel": "residual"}}),
        # the loop over the first config.num_hidden_layers of a list of config.n_layers, one field
        # under two names in the config's attribute_map (DBRX): all of it
        Example(_CLASSES.format(init=_INIT.replace("num_hidden_layers", "n_layers"), forward=_FORWARD, param=""),
                _CLASSES.format(init=_INIT_PP.replace("num_hidden_layers", "n_layers"), forward=_FORWARD_PP,
                                param=_PARAM),
                seed={"config_aliases": {"num_hidden_layers": "n_layers"}}),
        Example(_CLASSES.format(init=_INIT_NORM, forward=_FORWARD_NORM, param=""),
                _CLASSES.format(init=_INIT_NORM_PP, forward=_FORWARD_NORM_PP, param=_PARAM)),
    ]

    @classmethod
    def base(cls, ctx) -> str | None:
        """The base model class (the causal LM builds it under base_attr)."""
        plan = ctx.plan
        lm = ctx.idx.classes.get(plan.causal_lm)
        sub = lm.submodules.get(plan.base_attr) if lm is not None else None
        return sub.ctor if sub is not None and sub.ctor in plan.classes else None

    @classmethod
    def applies(cls, ctx) -> bool:
        plan = ctx.plan
        return bool(plan.lm_head) and plan.embed_path.startswith(f"{plan.base_attr}.") \
            and plan.embed_path.count(".") == 1 and cls.base(ctx) is not None

    @classmethod
    def classes(cls, ctx):
        return {cls.base(ctx)}

    def leave_ClassDef(self, original, updated):
        super().leave_ClassDef(original, updated)
        if self.scope or updated.name.value != self.base(self.ctx):
            return updated
        init, fwd = find_method(updated, "__init__"), find_method(updated, "forward")
        info = self.ctx.idx.classes[updated.name.value]
        lists = {a for a, s in info.submodules.items() if s.in_list}
        keeping = width_keeping(info, self.plan)
        embed = self.plan.embed_path.split(".")[1]
        if init is None or fwd is None or "intermediate_tensors" in param_names(fwd):
            return updated
        try:
            stages = analyse(updated, fwd, lists, embed, self.ctx.fused_residual.get(updated.name.value),
                             keeping)
            new_init = self._init(init, stages, embed)
            new_fwd = self._forward(fwd, stages)
        except ValueError:
            return updated
        body = [new_init if s is init else new_fwd if s is fwd else s for s in updated.body.body]
        return updated.with_changes(body=updated.body.with_changes(body=body))

    def _rank_arm(self, test: str, st: cst.BaseStatement, attr: str) -> cst.BaseStatement:
        arm = cst.parse_statement(f"if {test}:\n    pass\nelse:\n    self.{attr} = {self.ctx.use('PPMissingLayer')}()\n")
        inner = st.with_changes(leading_lines=[])  # type: ignore[attr-defined]
        return arm.with_changes(body=arm.body.with_changes(body=[inner]), leading_lines=st.leading_lines)  # type: ignore[attr-defined]

    def _init(self, init: cst.FunctionDef, st: Stages, embed: str) -> cst.FunctionDef:
        pp = f"{self.ctx.use('get_pp_group')}()"
        body = list(init.body.body)
        at = {a: next((i for i, s in enumerate(body) if _assigns(s, a)), None) for a in (embed, st.layers, *st.last_only)}
        if at[embed] is None or at[st.layers] is None:
            raise ValueError("the embedding or the layer list is not built by a statement of __init__")
        call = body[at[embed]].body[0].value  # type: ignore[attr-defined]
        width = next((a.value for a in call.args if a.keyword is not None and a.keyword.value == "embedding_dim"),
                     call.args[1].value if len(call.args) > 1 and call.args[1].keyword is None else None) \
            if isinstance(call, cst.Call) else None
        if width is None:
            raise ValueError("cannot read the embedding's width")
        tie = self.plan.tie_condition
        tied = tie if names_in(cst.parse_expression(tie)) <= {"config", "getattr"} and "config" in param_names(init) else "True"
        body[at[st.layers]] = self._make_layers(body[at[st.layers]], st.layers)
        body[at[embed]] = self._rank_arm(f"{pp}.is_first_rank or ({tied} and {pp}.is_last_rank)", body[at[embed]], embed)
        for a in st.last_only:
            if at[a] is not None:
                body[at[a]] = self._rank_arm(f"{pp}.is_last_rank", body[at[a]], a)  # type: ignore[index]
        keys = ", ".join(repr(n) for n in st.carried)
        body.append(cst.parse_statement(
            f"self.make_empty_intermediate_tensors = {self.ctx.use('make_empty_intermediate_tensors_factory')}"
            f"([{keys}], {code(width)})\n"))
        return init.with_changes(body=init.body.with_changes(body=body))

    def _make_layers(self, st: cst.BaseStatement, attr: str) -> cst.BaseStatement:
        value = st.body[0].value  # type: ignore[attr-defined]
        comp = m.ListComp(elt=m.Call(), for_in=m.CompFor(target=m.Name(), ifs=[], inner_for_in=None,
                                                          iter=m.Call(func=m.Name("range"), args=[m.Arg(keyword=None)])))
        if not (isinstance(value, cst.Call) and len(value.args) == 1 and m.matches(value.args[0].value, comp)):
            raise ValueError("the layer list is not built by one comprehension over range")
        lc = value.args[0].value
        var, count = lc.for_in.target.value, lc.for_in.iter.args[0].value
        self._count = code(count)
        pref = [a for a in lc.elt.args if a.keyword is not None and a.keyword.value == "prefix"]
        fs = pref[0].value if pref else None
        if not (isinstance(fs, cst.FormattedString) and len(fs.parts) >= 2
                and m.matches(fs.parts[-1], m.FormattedStringExpression(m.Name(var)))
                and m.matches(fs.parts[-2], m.FormattedStringText()) and fs.parts[-2].value.endswith(".")):
            raise ValueError("the layer's prefix does not end with its index")
        reads = names_in(lc.elt.with_changes(args=[a for a in lc.elt.args if a is not pref[0]]))
        if "prefix" in reads:
            raise ValueError("the layer's build reads the enclosing prefix")
        head = fs.parts[-2].value[:-1]
        parts = [*fs.parts[:-2], *([cst.FormattedStringText(head)] if head else [])]
        index = cst.parse_expression(f"{self.ctx.use('extract_layer_index')}(prefix)")
        elt = lc.elt.visit(_LayerIndex(var, index))
        new = cst.parse_statement(
            f"self.start_layer, self.end_layer, self.{attr} = {self.ctx.use('make_layers')}"
            f"({code(count)}, lambda prefix: {code(elt)}, prefix={code(fs.with_changes(parts=parts))})\n")
        return new.with_changes(leading_lines=st.leading_lines)

    def _forward(self, fwd: cst.FunctionDef, st: Stages) -> cst.FunctionDef:
        ctx = self.ctx
        pp = f"{ctx.use('get_pp_group')}()"
        body = list(fwd.body.body)
        pre, loop, post = body[:st.loop_at], body[st.loop_at], body[st.loop_at + 1:]
        it, bound, enum = loop_list(loop)  # type: ignore[arg-type]
        if bound is not None:
            aliases = self.ctx.config_aliases
            if _config_field(code(bound), aliases) != _config_field(self._count, aliases):
                raise ValueError("the loop runs over a part of the layer list")
        isl = f"{ctx.use('islice')}({code(it)}, self.start_layer, self.end_layer)"
        loop = loop.with_changes(iter=cst.parse_expression(  # type: ignore[attr-defined]
            f"enumerate({isl}, start=self.start_layer)" if enum else isl))
        first = [s for i, s in enumerate(pre) if i in st.first]
        arm = cst.parse_statement(f"if {pp}.is_first_rank:\n    pass\nelse:\n" + "".join(
            f"    {n} = intermediate_tensors[{n!r}]\n" for n in st.carried))
        arm = arm.with_changes(body=arm.body.with_changes(body=first))  # type: ignore[attr-defined]
        out = ", ".join(f"{n!r}: {n}" for n in st.carried)
        ret = cst.parse_statement(f"if not {pp}.is_last_rank:\n    return {ctx.use('IntermediateTensors')}({{{out}}})\n")
        kept = [s for i, s in enumerate(pre) if i not in st.first]
        param = cst.parse_module(
            f"def f(intermediate_tensors: {ctx.use('IntermediateTensors')} | None = None): pass\n").body[0].params.params[0]  # type: ignore[attr-defined]
        params = fwd.params.with_changes(params=[*fwd.params.params, param])
        return fwd.with_changes(params=params, body=fwd.body.with_changes(body=[*kept, arm, loop, ret, *post]))
