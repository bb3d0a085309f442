"""PT290 plain-attribute-assign: the rule `PlainAttributeAssign`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.passes.base import Example, Rule

_SELF_BUILD = m.AnnAssign(target=m.Attribute(value=m.Name("self")), value=m.Call())


class PlainAttributeAssign(Rule):
    descend_methods = frozenset({"__init__"})
    code = "PT290"
    name = "plain-attribute-assign"
    why = (
        "Remote code sometimes builds a submodule with a type annotation (MPT's "
        "`self.transformer: MPTModel = MPTModel(config)`). The index reads it as the submodule it "
        "builds; the port assigns it plainly, as the engine's model files do, so the rules that give "
        "a constructor the engine's arguments (cache and quantization config, prefix) see an "
        "ordinary assignment. An annotation without a value, or of a value that is no call, stays."
    )
    examples = [
        Example(
            "class LM(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.transformer: Model = Model(config)\n        self.n: int = config.n\n",
            "class LM(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.transformer = Model(config)\n        self.n: int = config.n\n",
        )
    ]

    def leave_AnnAssign(self, original, updated):
        if self.current_function != "__init__" or not m.matches(updated, _SELF_BUILD):
            return updated
        self.mark(f"{self.current_class}.__init__")
        return cst.Assign(targets=[cst.AssignTarget(updated.target)], value=updated.value,
                          semicolon=updated.semicolon)
