"""PT052 compile-base-model: the rule `CompileBaseModel`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst

from porter.analysis.cstutil import find_method, param_names
from porter.passes.base import Example, Rule


class CompileBaseModel(Rule):
    descend_methods = frozenset()
    code = "PT052"
    name = "compile-base-model"
    why = (
        "vLLM compiles the base model (the stack of decoder layers) when a user runs without "
        "`enforce_eager`: a hand-written port decorates that class with "
        "`@support_torch_compile` and names the flattened-token dimension of each tensor "
        "argument of its forward as dynamic. Without it the port runs eager where the native "
        "model and the Transformers backend compile. Only the causal LM's direct sub-model "
        "is decorated; arguments that are not token-indexed tensors stay static."
    )
    examples = [
        Example(
            "class AModel(nn.Module):\n"
            "    def forward(self, input_ids, positions, inputs_embeds=None):\n"
            "        return input_ids\n",
            "@support_torch_compile(dynamic_arg_dims={'input_ids': 0, 'positions': 0, "
            "'inputs_embeds': 0})\n"
            "class AModel(nn.Module):\n"
            "    def forward(self, input_ids, positions, inputs_embeds=None):\n"
            "        return input_ids\n",
            seed={"top_classes": ["AModel"]},
        )
    ]
    # forward arguments indexed by the flattened token dimension (dim 0) in the engine
    TOKEN_ARGS = ("input_ids", "positions", "inputs_embeds", "intermediate_tensors")

    def leave_ClassDef(self, original, updated):
        super().leave_ClassDef(original, updated)
        if self.scope or updated.name.value not in self.plan.top_classes:
            return updated
        fwd = find_method(updated, "forward")
        args = [a for a in param_names(fwd) if a in self.TOKEN_ARGS] if fwd else []
        if not args:
            return updated
        dims = ", ".join(f"{a!r}: 0" for a in args)
        dec = cst.Decorator(cst.parse_expression(
            f"{self.ctx.use('support_torch_compile')}(dynamic_arg_dims={{{dims}}})"))
        return updated.with_changes(decorators=[*updated.decorators, dec])
