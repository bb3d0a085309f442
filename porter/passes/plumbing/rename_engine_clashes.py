"""PT014 rename-engine-clashes: the rule `RenameEngineClashes`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst

from porter.passes.base import Example, Rule


# the engine layers a port builds inside classes it keeps from the file (every attention builds the
# engine's Attention in its own __init__); a class of the file under such a name would shadow it.
# (A file's class named like an engine layer the port uses instead of it, `GemmaRMSNorm`, is replaced
# or kept whole: no clash.)
BUILT_IN_KEPT_CLASSES = ("Attention",)


def engine_names() -> frozenset[str]:
    """The names the engine layers of BUILT_IN_KEPT_CLASSES bind in a port, for every target."""
    from porter.rules_data import targets

    return frozenset(t.symbols[k].split(":")[1] for t in targets().values() for k in BUILT_IN_KEPT_CLASSES
                     if k in t.symbols)


def _prefix(module: cst.Module) -> str:
    """The model's own prefix, from its causal LM class (`BaichuanForCausalLM` -> `Baichuan`)."""
    for st in module.body:
        if isinstance(st, cst.ClassDef):
            for end in ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "PreTrainedModel"):
                if st.name.value.endswith(end) and st.name.value != end:
                    return st.name.value[: -len(end)]
    return "Model"


class _Rename(cst.CSTTransformer):
    def __init__(self, names: dict[str, str]) -> None:
        self.names = names

    def visit_Attribute(self, node: cst.Attribute) -> bool:
        return False  # its value is renamed in leave_Attribute; its attribute name never is

    def leave_Attribute(self, original, updated):
        return updated.with_changes(value=updated.value.visit(self))

    def leave_Arg(self, original, updated):
        return updated.with_changes(keyword=original.keyword)  # `f(Attention=...)`: a keyword, not the class

    def leave_Name(self, original, updated):
        return updated.with_changes(value=self.names[updated.value]) if updated.value in self.names else updated


class RenameEngineClashes(Rule):
    code = "PT014"
    name = "rename-engine-clashes"
    why = (
        "Remote code names its classes as it likes (`class Attention(nn.Module)`, Baichuan); the port "
        "builds the engine's `Attention` inside the attention class it keeps, and a class of the file "
        "with that name would shadow the engine's and be taken for it. Before indexing, "
        "such a class is renamed with the model's prefix (that of its causal LM class: "
        "`BaichuanAttention`), everywhere the file names it; parameter names do not change."
    )
    examples = [
        Example(
            "from torch import nn\n\n\nclass Attention(nn.Module):\n    pass\n\n\n"
            "class Layer(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.self_attn = Attention(config=config)\n        self.Attention = config.Attention\n\n\n"
            "class FooPreTrainedModel(nn.Module):\n    pass\n",
            "from torch import nn\n\n\nclass FooAttention(nn.Module):\n    pass\n\n\n"
            "class Layer(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.self_attn = FooAttention(config=config)\n        self.Attention = config.Attention\n\n\n"
            "class FooPreTrainedModel(nn.Module):\n    pass\n",
        ),
        # must leave unchanged: a class whose name no engine symbol binds
        Example("from torch import nn\n\n\nclass FooAttention(nn.Module):\n    pass\n",
                "from torch import nn\n\n\nclass FooAttention(nn.Module):\n    pass\n"),
    ]

    @classmethod
    def applies(cls, ctx) -> bool:
        return True

    def rewrite(self, module: cst.Module) -> cst.Module:
        clash = engine_names() & {st.name.value for st in module.body if isinstance(st, cst.ClassDef)}
        if not clash:
            return module
        prefix = _prefix(module)
        names = {c: f"{prefix}{c}" for c in clash}
        taken = {st.name.value for st in module.body if isinstance(st, (cst.ClassDef, cst.FunctionDef))}
        if set(names.values()) & taken:
            return module
        for c in sorted(clash):
            self.mark(c)
        if hasattr(self.ctx, "renamed"):  # the index reads the source's lines under the new names
            self.ctx.renamed.update({new: old for old, new in names.items()})
        return module.visit(_Rename(names))  # type: ignore[return-value]
