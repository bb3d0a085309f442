"""PT313 identity-view: the rule `IdentityView`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import find_method, loop_module
from porter.passes.base import Example, Rule
from porter.passes.plumbing._stages import layer_loops, wide_after, width_keeping, writes
from porter.passes.plumbing.pipeline_stages import PipelineStages

_MODEL = (
    "from torch import nn\n\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n"
    "        super().__init__()\n        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)\n"
    "        self.h = nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)])\n"
    "        self.ln_f = nn.LayerNorm(config.hidden_size)\n\n"
    "    def forward(self, input_ids=None, positions=None, inputs_embeds=None):\n"
    "        if inputs_embeds is None:\n            inputs_embeds = self.wte(input_ids)\n"
    "        hidden_states = inputs_embeds\n"
    "        output_shape = {shape}\n"
    "        for block in self.h:\n            hidden_states = block(hidden_states)\n"
    "        hidden_states = self.ln_f(hidden_states)\n"
    "{view}"
    "        return hidden_states\n\n\n"
    "class AForCausalLM(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.model = AModel(config)\n"
    "        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)\n"
)
_SHAPE = "inputs_embeds.shape[:-1] + (hidden_states.size(-1),)"
_VIEW = "        hidden_states = hidden_states.view(output_shape)\n"


def _leading():
    """`t.shape[:-1]` / `t.size()[:-1]`: a tensor's shape without its last dimension."""
    t = m.Name()
    return m.Subscript(
        value=m.Attribute(value=t, attr=m.Name("shape")) | m.Call(func=m.Attribute(value=t, attr=m.Name("size")), args=[]),
        slice=[m.SubscriptElement(m.Slice(lower=None, step=None, upper=m.UnaryOperation(
            operator=m.Minus(), expression=m.Integer("1"))))])


def _last():
    """`t.size(-1)` / `t.shape[-1]`: a tensor's last dimension."""
    t = m.Name()
    minus_one = m.UnaryOperation(operator=m.Minus(), expression=m.Integer("1"))
    return m.Call(func=m.Attribute(value=t, attr=m.Name("size")), args=[m.Arg(minus_one, keyword=None)]) \
        | m.Subscript(value=m.Attribute(value=t, attr=m.Name("shape")), slice=[m.SubscriptElement(m.Index(minus_one))])


_SHAPE_OF = m.BinaryOperation(left=_leading(), operator=m.Add(), right=m.Tuple(elements=[m.Element(_last())]))


def _assign(st: cst.BaseStatement) -> tuple[str, cst.BaseExpression] | None:
    """`name = value` as one simple statement: (name, value)."""
    if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())])])):
        a = st.body[0]  # type: ignore[attr-defined]
        return a.targets[0].target.value, a.value
    return None


class IdentityView(Rule):
    descend_methods = frozenset()
    code = "PT313"
    name = "identity-view"
    why = (
        "HF base models that take `inputs_embeds` of shape (batch, seq, hidden) record the output's "
        "shape from them, `output_shape = inputs_embeds.shape[:-1] + (hidden_states.size(-1),)`, and "
        "view the last hidden state to it (GPT-BigCode). In the engine every tensor of the hidden "
        "stream is (num_tokens, width): where the tensors it is read from and the one it views are all "
        "shown to have the embedding's width (the dataflow of PT320: sums, casts, norms and the layers "
        "keep it), that shape is the viewed tensor's own and the view is the identity, so it goes (the "
        "shape, then unread, goes with it). Left as it is, it would be a shape a pipeline stage cannot "
        "receive, and the base model would stay one stage."
    )
    examples = [
        Example(_MODEL.format(shape=_SHAPE, view=_VIEW), _MODEL.format(shape=_SHAPE, view="")),
        # must leave unchanged: the shape's width is not the hidden stream's (a tensor of another width)
        Example(_MODEL.format(shape="inputs_embeds.shape[:-1] + (positions.size(-1),)", view=_VIEW),
                _MODEL.format(shape="inputs_embeds.shape[:-1] + (positions.size(-1),)", view=_VIEW)),
    ]

    @classmethod
    def applies(cls, ctx) -> bool:
        return PipelineStages.applies(ctx) and bool({"view", "reshape"} & ctx.idx.identifiers)

    @classmethod
    def classes(cls, ctx):
        return {PipelineStages.base(ctx)}

    def leave_ClassDef(self, original, updated):
        super().leave_ClassDef(original, updated)
        if self.scope or updated.name.value != PipelineStages.base(self.ctx):
            return updated
        fwd = find_method(updated, "forward")
        if fwd is None:
            return updated
        info = self.ctx.idx.classes[updated.name.value]
        lists = {a for a, s in info.submodules.items() if s.in_list}
        keeping = width_keeping(info, self.plan)
        embed = self.plan.embed_path.split(".")[1]
        loops = layer_loops(fwd, lists)
        wide, shapes, body = {"inputs_embeds"}, set(), []
        for st in fwd.body.body:
            if loops and st is loops[0]:
                layer_var = loop_module(st)[0]  # type: ignore[index]
                for inner in st.body.body:  # type: ignore[attr-defined]
                    wide = wide_after(inner, wide, embed, layer_var, keeping)
                shapes -= writes(st)
                body.append(st)
                continue
            bound = _assign(st)
            if bound is not None and self._identity(*bound, wide, shapes):
                continue
            shapes -= writes(st)
            # (T, W) from tensors of the width: the hidden stream's own shape
            if bound is not None and m.matches(bound[1], _SHAPE_OF) and _read_from(bound[1]) <= wide:
                shapes.add(bound[0])
            wide = wide_after(st, wide, embed, keeping=keeping)
            body.append(st)
        if len(body) == len(fwd.body.body):
            return updated
        new_fwd = fwd.with_changes(body=fwd.body.with_changes(body=body))
        return updated.with_changes(body=updated.body.with_changes(
            body=[new_fwd if s is fwd else s for s in updated.body.body]))

    def _identity(self, name: str, value: cst.BaseExpression, wide: set[str], shapes: set[str]) -> bool:
        """`x = x.view(S)` / `x.reshape(S)` with x of the width and S a shape of the width's tensors."""
        view = m.Call(func=m.Attribute(value=m.Name(name), attr=m.Name("view") | m.Name("reshape")),
                      args=[m.Arg(m.Name(), keyword=None)])
        return name in wide and m.matches(value, view) and value.args[0].value.value in shapes  # type: ignore[attr-defined]


def _read_from(shape: cst.BinaryOperation) -> set[str]:
    """The two tensors `a.shape[:-1] + (b.size(-1),)` reads: {a, b}."""
    lead = shape.left.value  # type: ignore[attr-defined]
    last = shape.right.elements[0].value  # type: ignore[attr-defined]
    a = lead.value.value if isinstance(lead, cst.Attribute) else lead.func.value.value
    b = last.func.value.value if isinstance(last, cst.Call) else last.value.value.value
    return {a, b}
