"""PT295 load-buffers: the rule `LoadBuffers`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import findall
from porter.passes.base import Example, Rule

_PARAMS = m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name("params_dict"))],
                                               value=m.Call(args=[m.Arg(m.Call(func=m.Attribute(
                                                   value=m.Name("self"), attr=m.Name("named_parameters"))))]))])
_BUFFERS = m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name("named_buffers")))
_LOAD = "        params_dict.update(self.named_buffers())  # persistent buffers the checkpoint carries\n"

_BEFORE = (
    "from torch import nn\n\n\nclass Layer(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.layer_scalar = nn.Buffer(torch.ones(1))\n\n    def forward(self, x):\n"
    "        return x * self.layer_scalar\n\n\n"
    "class AModel(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)\n"
    "        self.layers = nn.ModuleList([Layer(config) for _ in range(2)])\n\n\n"
    "class AForCausalLM(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.model = AModel(config)\n\n    def load_weights(self, weights):\n"
    "        params_dict = dict(self.named_parameters())\n{load}"
    "        for name, loaded_weight in weights:\n            params_dict[name].copy_(loaded_weight)\n"
)


def _persistent(call: cst.Call) -> bool:
    """`nn.Buffer(x)` / `self.register_buffer("n", x)` without `persistent=False`."""
    return not any(m.matches(a, m.Arg(keyword=m.Name("persistent"), value=m.Name("False"))) for a in call.args)


class LoadBuffers(Rule):
    descend_methods = frozenset()
    code = "PT295"
    name = "load-buffers"
    why = (
        "A persistent buffer the port keeps is in the checkpoint (Gemma-4's per-layer `layer_scalar = "
        "nn.Buffer(torch.ones(1))`), but load_weights looks names up among the parameters only: it also "
        "looks them up among the buffers, as vLLM's gemma4 does for its `layer_scalar`. Buffers the rules "
        "before took into engine layers (a router's `expert_bias`, now FusedMoE's) are not the port's any more "
        "and change nothing."
    )
    examples = [Example(_BEFORE.format(load=""), _BEFORE.format(load=_LOAD))]

    @classmethod
    def applies(cls, ctx) -> bool:
        return "Buffer" in ctx.idx.identifiers or "register_buffer" in ctx.idx.identifiers

    def leave_Module(self, original, updated):
        buffers = m.Call(func=m.Attribute(value=m.Name("nn"), attr=m.Name("Buffer")) | m.Attribute(
            value=m.Name("self"), attr=m.Name("register_buffer")))
        kept = [c for st in updated.body if isinstance(st, cst.ClassDef) and self.kept(st.name.value)
                for c in findall(st, buffers) if _persistent(c)]  # type: ignore[arg-type]
        if not kept or findall(updated, _BUFFERS):
            return updated
        lm = self.plan.causal_lm
        out = updated.visit(_AfterParams())
        if not out.deep_equals(updated):
            self.mark(f"{lm}.load_weights")
        return out


class _AfterParams(cst.CSTTransformer):
    def leave_IndentedBlock(self, original, updated):
        body: list[cst.BaseStatement] = []
        for st in updated.body:
            body.append(st)
            if m.matches(st, _PARAMS):
                body.append(cst.parse_statement(_LOAD.strip() + "\n"))
        return updated.with_changes(body=body) if len(body) != len(updated.body) else updated
