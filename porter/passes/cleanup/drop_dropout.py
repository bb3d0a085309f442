"""PT012 drop-dropout: the rule `DropDropout`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import dotted, self_attr
from porter.passes.base import Example, Rule


class DropDropout(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT012"
    name = "drop-dropout"
    why = (
        "Inference never applies dropout: `nn.functional.dropout(x, p=..., training=self.training)` "
        "and calls of an `nn.Dropout` sub-module are replaced by their input."
    )
    examples = [
        Example(
            "class A(nn.Module):\n    def forward(self, x):\n"
            "        x = nn.functional.dropout(x, p=self.p, training=self.training)\n"
            "        return x\n",
            "class A(nn.Module):\n    def forward(self, x):\n        return x\n",
        ),
        Example(
            "from torch import nn\n\n\nclass A(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.dropout = nn.Dropout(config.dropout)\n\n"
            "    def forward(self, x):\n        return self.o_proj(self.dropout(x))\n",
            "from torch import nn\n\n\nclass A(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.dropout = nn.Dropout(config.dropout)\n\n"
            "    def forward(self, x):\n        return self.o_proj(x)\n",
        ),
    ]

    def leave_Call(self, original, updated):
        if not self.kept(self.current_class):
            return updated
        name = dotted(updated.func) or ""
        is_dropout = name.endswith("functional.dropout") or name == "F.dropout"
        attr = self_attr(updated.func)
        if attr is not None:
            info = self.ctx.idx.classes.get(self.current_class or "")
            sub = info.submodules.get(attr) if info else None
            is_dropout = is_dropout or (sub is not None and sub.ctor == "torch.nn.Dropout")
        if is_dropout and updated.args:
            return updated.args[0].value
        return updated

    def leave_Assign(self, original, updated):
        # `x = x` left by dropout removal
        if len(updated.targets) == 1 and m.matches(updated.value, m.Name()) and m.matches(
                updated.targets[0].target, m.Name()) and updated.value.value == updated.targets[0].target.value:  # type: ignore[attr-defined]
            return cst.RemoveFromParent()
        return updated
