"""PT102 checkpoint-module-names: the rule `CheckpointModuleNames`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst

from porter.analysis.cstutil import self_attr
from porter.passes.base import Example, Rule


class CheckpointModuleNames(Rule):
    descend_methods = None
    code = "PT102"
    name = "checkpoint-module-names"
    why = (
        "transformers renames some modules when loading (`WeightRenaming('.block_sparse_moe.', "
        "'.mlp.')` in conversion_mapping.py) and writes the old name back when saving, so the "
        "checkpoint on disk, and the engine's native port, call the module by its checkpoint name. "
        "The port does too: the attribute is renamed wherever the class builds or reads it, and "
        "`load_weights` needs no renaming for it."
    )
    @classmethod
    def applies(cls, ctx) -> bool:
        return bool(ctx.plan.module_renames)

    examples = [
        Example(
            "class Layer(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.mlp = Moe(config)\n\n    def forward(self, x):\n        return self.mlp(x)\n",
            "class Layer(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.block_sparse_moe = Moe(config)\n\n    def forward(self, x):\n"
            "        return self.block_sparse_moe(x)\n",
            seed={"module_renames": {"mlp": "block_sparse_moe"}},
        ),
    ]

    def leave_Attribute(self, original, updated):
        info = self.ctx.idx.classes.get(self.current_class or "")
        attr = self_attr(updated)
        if info is None or not self.kept(info.name) or attr not in self.plan.module_renames:
            return updated
        if attr not in info.submodules:
            return updated
        return updated.with_changes(attr=cst.Name(self.plan.module_renames[attr]))
