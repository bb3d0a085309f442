"""PT333 eagle3-hooks: the rule `Eagle3Hooks`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, find_method, findall, names_in
from porter.passes.base import Example, Rule
from porter.passes.plumbing.pipeline_stages import PipelineStages
from porter.rules_data import eagle3_target

_FILE = (
    "import torch\nfrom torch import nn\n\n\nclass AModel({mixin}):\n{over_pp}"
    "    def __init__(self, config):\n        super().__init__()\n"
    "        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)\n\n"
    "    def forward(self, input_ids=None, positions=None, inputs_embeds=None, intermediate_tensors=None):\n"
    "        if get_pp_group().is_first_rank:\n"
    "            hidden_states = self.embed_tokens(input_ids)\n            residual = None\n"
    "        else:\n            hidden_states = intermediate_tensors['hidden_states']\n"
    "            residual = intermediate_tensors['residual']\n"
    "{before}"
    "        for {target}:\n"
    "            hidden_states, residual = layer(hidden_states, positions=positions, residual=residual)\n{add}"
    "        if not get_pp_group().is_last_rank:\n"
    "            return IntermediateTensors({{'hidden_states': hidden_states, 'residual': residual{pack}}})\n"
    "        hidden_states, _ = self.norm(hidden_states, residual)\n{ret}"
    "\n\nclass AForCausalLM({bases}):\n    def __init__(self, config):\n"
    "        super().__init__()\n        self.model = AModel(config)\n"
    "        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)\n\n"
    "    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):\n"
    "        return self.model(input_ids=input_ids, positions=positions, inputs_embeds=inputs_embeds, "
    "intermediate_tensors=intermediate_tensors)\n"
)
_BEFORE = _FILE.format(
    mixin="nn.Module", over_pp="", before="", target="layer in islice(self.layers, self.start_layer, self.end_layer)",
    add="", pack="", ret="        return hidden_states\n", bases="nn.Module, SupportsPP",
)
_AFTER = _FILE.format(
    mixin="nn.Module, EagleModelMixin", over_pp="    supports_aux_hidden_states_over_pp = True\n",
    before=(
        "        remote_aux = self.collect_remote_aux_hidden_states(intermediate_tensors)\n"
        "        aux_hidden_states: list[torch.Tensor] = []\n"
        "        if get_pp_group().is_first_rank:\n"
        "            self._maybe_add_hidden_state(aux_hidden_states, self.start_layer, hidden_states, residual)\n"
    ),
    target="idx, layer in enumerate(islice(self.layers, self.start_layer, self.end_layer), start=self.start_layer)",
    add="            self._maybe_add_hidden_state(aux_hidden_states, idx + 1, hidden_states, residual)\n",
    pack=", **self.pack_local_aux_hidden_states(aux_hidden_states)",
    ret=(
        "        aux_hidden_states = remote_aux + aux_hidden_states\n"
        "        if len(aux_hidden_states) > 0:\n            return hidden_states, aux_hidden_states\n"
        "        return hidden_states\n"
    ),
    bases="nn.Module, SupportsPP, SupportsEagle3",
)
# the loop counts the layers already (from the stage's first): that index
_COUNTED = (_BEFORE.replace("layer in islice(self.layers, self.start_layer, self.end_layer)",
                            "i, layer in enumerate(islice(self.layers, self.start_layer, self.end_layer), "
                            "start=self.start_layer)"),
            _AFTER.replace("idx, layer in", "i, layer in").replace("idx + 1", "i + 1"))
# the causal LM does more with the base model's output than return it: no hooks
_SCALED = _BEFORE.replace("        return self.model(", "        return 2 * self.model(")
_SEED = {"model_type": "llama", "fused_residual": {"AModel": "residual"}}


def _is_pp_return(st: cst.BaseStatement) -> bool:
    return m.matches(st, m.If(test=m.UnaryOperation(operator=m.Not(), expression=m.Attribute(
        value=m.Call(func=m.Name()), attr=m.Name("is_last_rank")))))


_ISLICE = m.Call(func=m.Name(), args=[m.Arg(m.Attribute(value=m.Name("self"))),
                                      m.Arg(m.Attribute(value=m.Name("self"), attr=m.Name("start_layer"))),
                                      m.Arg(m.Attribute(value=m.Name("self"), attr=m.Name("end_layer")))])
# the loop with the layer's index counted from the stage's first layer
_ENUMERATED = m.For(
    target=m.Tuple([m.Element(m.Name()), m.Element(m.Name())]),
    iter=m.Call(func=m.Name("enumerate"), args=[m.Arg(_ISLICE), m.Arg(
        m.Attribute(value=m.Name("self"), attr=m.Name("start_layer")), keyword=m.Name("start"))]),
)


def _stage_loop(st: cst.BaseStatement) -> bool:
    return m.matches(st, m.For(target=m.Name(), iter=_ISLICE) | _ENUMERATED)


class Eagle3Hooks(Rule):
    descend_methods = frozenset()  # works on the module as a whole
    code = "PT333"
    name = "eagle3-hooks"
    why = (
        "An EAGLE-3 draft (speculative decoding, `method: eagle3`) reads the target's hidden states "
        "after the layers its config names; the engine asks the target for them through "
        "SupportsEagle3 (`set_aux_hidden_state_layers`), and the target's base model, an "
        "EagleModelMixin, collects the residual stream (the hidden states plus the residual the "
        "layers hand on) after each of those layers, hands them across pipeline stages beside the "
        "hidden states, and returns them with its output. The engine's own class of a model type "
        "declares it (rules/eagle3.yaml lists those types); the port declares the same on the staged "
        "base model PT320 wrote (its loop over start_layer..end_layer, the IntermediateTensors of an "
        "earlier stage), where the causal LM returns the base model's output as it is. Anything else "
        "(a loop carrying more than the hidden states and the fused residual, a loop that breaks, "
        "a causal LM that post-processes the hidden states) is left as it is: the engine refuses an "
        "EAGLE-3 draft for it."
    )
    examples = [Example(_BEFORE, _AFTER, seed=_SEED), Example(*_COUNTED, seed=_SEED), Example(_SCALED, _SCALED, seed=_SEED)]

    @classmethod
    def applies(cls, ctx) -> bool:
        return eagle3_target(ctx.plan.model_type) and ctx.plan.base_attr == "model"

    def leave_Module(self, original, updated):
        base = PipelineStages.base(self.ctx) if self.ctx.plan.causal_lm else None
        classes = {st.name.value: st for st in updated.body if isinstance(st, cst.ClassDef)}
        lm = classes.get(self.plan.causal_lm)
        if base not in classes or lm is None or not self._returns_base(lm):
            return updated
        model = self._hooked(classes[base])  # type: ignore[index]
        if model is None:
            return updated
        head = lm.with_changes(bases=[*lm.bases, cst.Arg(cst.Name(self.ctx.use("SupportsEagle3")))])
        self.mark(f"{base}.forward")
        self.mark(self.plan.causal_lm)
        body = [model if st is classes[base] else head if st is lm else st for st in updated.body]  # type: ignore[index]
        return updated.with_changes(body=body)

    def _returns_base(self, lm: cst.ClassDef) -> bool:
        """The causal LM's forward returns what `self.model(...)` returns, as it is."""
        fwd = find_method(lm, "forward")
        if fwd is None or not isinstance(fwd.body, cst.IndentedBlock) or len(findall(fwd, m.Return())) != 1:
            return False
        call = m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name("model")))
        body = list(fwd.body.body)
        if m.matches(body[-1], m.SimpleStatementLine(body=[m.Return(call)])):
            return True
        kept = m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())], value=call)])
        if len(body) < 2 or not m.matches(body[-2], kept):
            return False
        name = body[-2].body[0].targets[0].target.value  # type: ignore[attr-defined]
        return m.matches(body[-1], m.SimpleStatementLine(body=[m.Return(m.Name(name))]))

    def _hooked(self, cls: cst.ClassDef) -> cst.ClassDef | None:
        fwd = find_method(cls, "forward")
        if fwd is None or not isinstance(fwd.body, cst.IndentedBlock):
            return None
        body = list(fwd.body.body)
        at = [i for i, st in enumerate(body) if _stage_loop(st)]
        if len(at) != 1 or at[0] + 1 >= len(body) or not _is_pp_return(body[at[0] + 1]):
            return None
        i = at[0]
        loop, pp = body[i], body[i + 1]
        tail = body[i + 2:]
        if not tail or len(findall(cst.Module(body=tail), m.Return())) != 1 \
                or not m.matches(tail[-1], m.SimpleStatementLine(body=[m.Return(m.Name())])):
            return None
        if findall(loop, m.Break() | m.Continue() | m.Return()):
            return None
        carried = self._carried(pp, cls.name.value)
        used = names_in(fwd)
        if carried is None or used & {"aux_hidden_states", "remote_aux", "idx"}:
            return None
        hidden, residual = carried
        if m.matches(loop, _ENUMERATED):  # its own index
            index = loop.target.elements[0].value.value  # type: ignore[attr-defined]
            new_loop = loop
        else:
            index = "idx"
            new_loop = loop.with_changes(  # type: ignore[call-arg]
                target=cst.parse_expression(f"idx, {code(loop.target)}"),  # type: ignore[attr-defined]
                iter=cst.parse_expression(
                    f"enumerate({code(loop.iter)}, start=self.start_layer)"),  # type: ignore[attr-defined]
            )
        pp_group = f"{self.ctx.use('get_pp_group')}()"
        add = f"self._maybe_add_hidden_state(aux_hidden_states, {{}}, {hidden}, {residual})\n"
        before = [
            cst.parse_statement("remote_aux = self.collect_remote_aux_hidden_states(intermediate_tensors)\n"),
            cst.parse_statement("aux_hidden_states: list[torch.Tensor] = []\n"),
            cst.parse_statement(f"if {pp_group}.is_first_rank:\n    " + add.format("self.start_layer")),
        ]
        new_loop = new_loop.with_changes(body=new_loop.body.with_changes(  # type: ignore[attr-defined]
            body=[*new_loop.body.body, cst.parse_statement(add.format(f"{index} + 1"))]))  # type: ignore[attr-defined]
        handed = self._dict(pp)
        packed = pp.deep_replace(handed, handed.with_changes(elements=[  # type: ignore[union-attr,arg-type]
            *handed.elements,  # type: ignore[union-attr]
            cst.StarredDictElement(cst.parse_expression("self.pack_local_aux_hidden_states(aux_hidden_states)")),
        ]))
        out = tail[-1].body[0].value.value  # type: ignore[attr-defined]
        ret = [
            cst.parse_statement("aux_hidden_states = remote_aux + aux_hidden_states\n"),
            cst.parse_statement(f"if len(aux_hidden_states) > 0:\n    return {out}, aux_hidden_states\n"),
        ]
        new_body = [*body[:i], *before, new_loop, packed, *tail[:-1], *ret, tail[-1]]
        fwd_new = fwd.with_changes(body=fwd.body.with_changes(body=new_body))
        flag = cst.parse_statement("supports_aux_hidden_states_over_pp = True\n")
        cls_body = [flag, *[fwd_new if st is fwd else st for st in cls.body.body]]
        mixin = cst.Arg(cst.Name(self.ctx.use("EagleModelMixin")))
        return cls.with_changes(bases=[*cls.bases, mixin], body=cls.body.with_changes(body=cls_body))

    @staticmethod
    def _dict(pp: cst.BaseStatement) -> cst.Dict | None:
        found = findall(pp, m.Call(args=[m.Arg(m.Dict())]))
        return found[0].args[0].value if len(found) == 1 else None  # type: ignore[attr-defined,return-value]

    def _carried(self, pp: cst.BaseStatement, base: str) -> tuple[str, str] | None:
        """(the hidden states, the residual or None) the stage hands on: the hidden states alone, or
        beside the fused residual PT330 threads (the residual stream is their sum)."""
        d = self._dict(pp)
        if d is None or not all(isinstance(e, cst.DictElement) and isinstance(e.value, cst.Name) for e in d.elements):
            return None
        values = [e.value.value for e in d.elements]  # type: ignore[attr-defined]
        residual = self.ctx.fused_residual.get(base)
        rest = [v for v in values if v != residual]
        if len(rest) != 1 or len(values) - len(rest) > 1:
            return None
        return rest[0], (residual if residual in values else "None")
