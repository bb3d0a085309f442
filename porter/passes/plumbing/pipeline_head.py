"""PT321 pipeline-head: the rule `PipelineHead`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, find_method, findall, self_attr
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

# load_weights through a method of the port's (a fused projection's rows regrouped, BLOOM's and
# Falcon's q/k/v): the module it looks up by name is skipped where another stage holds it
_PORT_WEIGHTS = (
    "    def load_weights(self, weights):\n        loader = AutoWeightsLoader(self)\n"
    "        return loader.load_weights(self.port_weights(weights))\n\n"
    "    def port_weights(self, weights):\n        for name, loaded_weight in weights:\n"
    "            if '.qkv.' in name:\n                module, _, leaf = name.rpartition('.')\n{check}"
    "                qkv = self.get_submodule(module)\n"
    "                loaded_weight = loaded_weight.view(qkv.total_num_heads, 3, -1).transpose(0, 1).reshape(-1)\n"
    "            yield name, loaded_weight\n"
)
_MODULE_CHECK = "                if is_pp_missing_parameter(module, self):\n                    continue\n"


def _lm_through(bases: str, head: str, make: str, it: str, check: str) -> str:
    lm = _lm(bases, head, make, it, "")
    return lm[:lm.index("    def load_weights")] + _PORT_WEIGHTS.format(check=check)


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
            for path in _looked_up(st):
                body.append(cst.parse_statement(f"if {self.check}({path}, self):\n    continue\n"))
            body.append(st)
        return updated.with_changes(body=body)


# `self.get_submodule(path)` / `self.get_parameter(path)`: a module or parameter looked up by its
# name, which on a pipeline stage that does not hold it is a PPMissingLayer's (an AttributeError)
_GETTER = m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name("get_submodule") | m.Name("get_parameter")),
                 args=[m.Arg(keyword=None)])


def _header(st: cst.BaseStatement) -> cst.CSTNode | None:
    """What a statement runs before any block of its own: a simple statement whole, the test of an
    `if`/`while`, the iterable of a `for`, the context managers of a `with`."""
    if isinstance(st, cst.SimpleStatementLine):
        return st
    if isinstance(st, (cst.If, cst.While)):
        return st.test
    if isinstance(st, cst.For):
        return st.iter
    if isinstance(st, cst.With):
        return cst.Tuple([cst.Element(i.item) for i in st.items])
    return None


def _looked_up(st: cst.BaseStatement) -> list[str]:
    """The paths a statement looks up through `self.get_submodule`/`get_parameter` before any block
    of its own (a simple statement, or the header of an `if`/`while`/`for`/`with`), in order; a path
    the statement itself binds a name of is not one (it has no value before the statement)."""
    header = _header(st)
    if header is None:
        return []
    # names the statement's own expressions bind (a walrus, a comprehension's variables)
    bound = {n.value for b in findall(header, m.NamedExpr() | m.CompFor())
             for n in findall(b.target, m.Name())}  # type: ignore[attr-defined]
    paths = []
    for call in findall(header, _GETTER):
        arg = call.args[0].value  # type: ignore[attr-defined]
        if not {n.value for n in findall(arg, m.Name())} & bound:
            paths.append(code(arg))
    return list(dict.fromkeys(paths))


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
        "another stage holds (`is_pp_missing_parameter`), before their lookup in the parameters and "
        "before a module or parameter the port's own loading looks up by name (`self.get_submodule`, "
        "`self.get_parameter`: a PPMissingLayer's on that stage). A forward that does more with the base "
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
        Example(_lm_through("nn.Module", _HEAD, "", "", ""),
                _lm_through("nn.Module, SupportsPP", _HEAD_PP, _MAKE, ", intermediate_tensors=intermediate_tensors",
                            _MODULE_CHECK),
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
        skip = _SkipMissing(self.ctx.use("is_pp_missing_parameter"))
        new[load] = load.visit(skip)
        # the methods load_weights reads the checkpoint through (`self.port_weights(weights)`)
        for call in findall(load, m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name()))):
            method = find_method(updated, call.func.attr.value)  # type: ignore[attr-defined]
            if method is not None and method not in new:
                new[method] = method.visit(skip)
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
