"""PT321 pipeline-head: the rule `PipelineHead`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import find_method, findall, self_attr
from porter.passes.base import Example, Rule
from porter.passes.plumbing.pipeline_stages import PipelineStages

_BASE = (
    "from torch import nn\n\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n"
    "        super().__init__()\n        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)\n"
    "        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(['hidden_states'], "
    "config.hidden_size)\n\n\n"
)
_LM = (
    "class AForCausalLM({bases}):\n    def __init__(self, *, vllm_config, prefix=''):\n        super().__init__()\n"
    "        config = vllm_config.model_config.hf_config\n        self.model = AModel(config)\n"
    "{head}"
    "        self.logits_processor = LogitsProcessor(config.vocab_size)\n{make}\n"
    "    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):\n"
    "        return self.model(input_ids=input_ids, positions=positions, inputs_embeds=inputs_embeds{it})\n\n"
    "    def load_weights(self, weights):\n        params_dict = dict(self.named_parameters())\n"
    "        for name, loaded_weight in weights:\n{check}"
    "            param = params_dict[name]\n            default_weight_loader(param, loaded_weight)\n"
)
_HEAD = (
    "        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)\n"
    "        if config.tie_word_embeddings:\n            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)\n"
)
_HEAD_PP = (
    "        if get_pp_group().is_last_rank:\n"
    "            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)\n"
    "            if config.tie_word_embeddings:\n"
    "                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)\n"
    "        else:\n            self.lm_head = PPMissingLayer()\n"
)
_TIED = "        self.use_tied_lm_head = model_should_use_tied_lm_head(config, quant_config)\n"
_HEAD_APH = (
    "        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)\n" + _TIED
    + "        if self.use_tied_lm_head:\n            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)\n"
)
_HEAD_APH_PP = _TIED + (
    "        if get_pp_group().is_last_rank:\n"
    "            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)\n"
    "            if self.use_tied_lm_head:\n"
    "                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)\n"
    "        else:\n            self.lm_head = PPMissingLayer()\n"
)
_MAKE = "        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors\n"
_CHECK = "            if is_pp_missing_parameter(name, self):\n                continue\n"


def _lm(bases: str, head: str, make: str, it: str, check: str) -> str:
    return _BASE + _LM.format(bases=bases, head=head, make=make, it=it, check=check)


_LOOKUP = m.SimpleStatementLine(body=[m.Assign(value=m.Subscript(
    value=m.Name("params_dict"), slice=[m.SubscriptElement(m.Index(m.Name()))]))])


class _SkipMissing(cst.CSTTransformer):
    """Before each `param = params_dict[name]` in a loop: skip a parameter another stage holds."""

    def __init__(self, check: str) -> None:
        super().__init__()
        self.check, self.loops = check, 0

    def visit_For(self, node):
        self.loops += 1

    def leave_For(self, original, updated):
        self.loops -= 1
        return updated

    def leave_IndentedBlock(self, original, updated):
        if self.loops == 0:
            return updated
        body: list = []
        for st in updated.body:
            if m.matches(st, _LOOKUP):
                name = st.body[0].value.slice[0].slice.value.value  # type: ignore[attr-defined]
                body.append(cst.parse_statement(f"if {self.check}({name}, self):\n    continue\n"))
            body.append(st)
        return updated.with_changes(body=body)


class PipelineHead(Rule):
    descend_methods = frozenset()
    code = "PT321"
    name = "pipeline-head"
    why = (
        "Where PT320 split the base model into pipeline stages, the causal LM declares SupportsPP and "
        "follows vLLM's llama.py: the head (and its tie to the embedding) is built on the last rank "
        "only (PPMissingLayer elsewhere), forward hands `intermediate_tensors` to the base model and "
        "returns what it returns (IntermediateTensors on an earlier stage), "
        "`make_empty_intermediate_tensors` is the base model's, and load_weights skips the parameters "
        "another stage holds (`is_pp_missing_parameter`). A forward that does more with the base "
        "model's output than return it is left without SupportsPP: the engine refuses PP > 1."
    )
    examples = [
        Example(_lm("nn.Module", _HEAD, "", "", ""),
                _lm("nn.Module, SupportsPP", _HEAD_PP, _MAKE, ", intermediate_tensors=intermediate_tensors", _CHECK),
                seed={"lm_head": "lm_head"}),  # (the planner reads the head from HF's nn.Linear, gone here)
        # Aphrodite's head: the tie flag, read between the head's statements, is set before them on every rank
        Example(_lm("nn.Module", _HEAD_APH, "", "", ""),
                _lm("nn.Module, SupportsPP", _HEAD_APH_PP, _MAKE, ", intermediate_tensors=intermediate_tensors", _CHECK),
                seed={"lm_head": "lm_head"}),
    ]

    @classmethod
    def applies(cls, ctx) -> bool:
        return PipelineStages.applies(ctx)

    @classmethod
    def classes(cls, ctx):
        return {ctx.plan.causal_lm, PipelineStages.base(ctx)}

    def visit_Module(self, node):
        base = PipelineStages.base(self.ctx)
        self._staged = any(
            isinstance(c, cst.ClassDef) and c.name.value == base and findall(c, m.Assign(targets=[m.AssignTarget(
                m.Attribute(value=m.Name("self"), attr=m.Name("make_empty_intermediate_tensors")))]))
            for c in node.body)
        return True

    def leave_ClassDef(self, original, updated):
        super().leave_ClassDef(original, updated)
        if self.scope or updated.name.value != self.plan.causal_lm or not self._staged:
            return updated
        init, fwd, load = (find_method(updated, n) for n in ("__init__", "forward", "load_weights"))
        if init is None or fwd is None or load is None:
            return updated
        try:
            new = {init: self._init(init), fwd: self._forward(fwd)}
        except ValueError:
            return updated
        new[load] = load.visit(_SkipMissing(self.ctx.use("is_pp_missing_parameter")))
        body = [new.get(s, s) for s in updated.body.body]
        bases = [*updated.bases, cst.Arg(cst.Name(self.ctx.use("SupportsPP")))]
        return updated.with_changes(bases=bases, body=updated.body.with_changes(body=body))

    def _init(self, init: cst.FunctionDef) -> cst.FunctionDef:
        head = self.plan.lm_head
        body = list(init.body.body)
        at = [i for i, s in enumerate(body) if any(
            self_attr(t.target) == head for a in findall(s, m.Assign()) for t in a.targets)]  # type: ignore[attr-defined]
        if not at:
            raise ValueError("no statement builds the head")
        lo, hi = at[0], at[-1]
        reads_head = m.Attribute(value=m.Name("self"), attr=m.Name(head))
        hoisted, kept = [], []
        for s in body[lo:hi + 1]:
            built = {self_attr(t.target) for a in findall(s, m.Assign()) for t in a.targets}  # type: ignore[attr-defined]
            if not built or head in built:  # (a statement that builds nothing stays with the head's, as it stood)
                if built - {head}:
                    raise ValueError("the head's statements build something else too")
                kept.append(s)
            elif None not in built and not findall(s, reads_head):
                # between the head's statements, a setting of its own that the head reads (Aphrodite's
                # `self.use_tied_lm_head = model_should_use_tied_lm_head(...)`): built before, on every rank
                hoisted.append(s)
            else:
                raise ValueError("a statement among the head's is not the head's")
        arm = cst.parse_statement(
            f"if {self.ctx.use('get_pp_group')}().is_last_rank:\n    pass\n"
            f"else:\n    self.{head} = {self.ctx.use('PPMissingLayer')}()\n")
        arm = arm.with_changes(body=arm.body.with_changes(body=kept))  # type: ignore[attr-defined]
        make = cst.parse_statement(
            f"self.make_empty_intermediate_tensors = self.{self.plan.base_attr}.make_empty_intermediate_tensors\n")
        return init.with_changes(body=init.body.with_changes(
            body=[*body[:lo], *hoisted, arm, *body[hi + 1:], make]))

    def _forward(self, fwd: cst.FunctionDef) -> cst.FunctionDef:
        base = m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(self.plan.base_attr)))
        body = fwd.body.body
        ret = body[-1] if body else None
        direct = m.SimpleStatementLine(body=[m.Return(base)])
        if not (len(body) == 1 and m.matches(ret, direct)):
            raise ValueError("forward does more with the base model's output than return it")
        call = ret.body[0].value  # type: ignore[union-attr]
        if any(a.keyword is None for a in call.args) or "intermediate_tensors" not in {
                p.name.value for p in fwd.params.params}:
            raise ValueError("the base model is called with positional arguments")
        arg = cst.Arg(keyword=cst.Name("intermediate_tensors"), value=cst.Name("intermediate_tensors"),
                      equal=cst.AssignEqual(whitespace_before=cst.SimpleWhitespace(""),
                                            whitespace_after=cst.SimpleWhitespace("")))
        args = [*call.args[:-1], call.args[-1].with_changes(comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))), arg]
        new_ret = ret.with_changes(body=[ret.body[0].with_changes(value=call.with_changes(args=args))])  # type: ignore[union-attr]
        return fwd.with_changes(body=fwd.body.with_changes(body=[new_ret]))
