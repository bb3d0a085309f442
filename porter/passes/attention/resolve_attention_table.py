"""A sub-module class picked at run time from HF's attention-implementation table."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.index import table_alias, table_class
from porter.passes.base import Example, Rule


class ResolveAttentionTable(Rule):
    descend_methods = frozenset({"__init__"})
    code = "PT122"
    name = "resolve-attention-table"
    why = (
        "Older HF files pick the attention class at run time from a module-level table keyed by "
        "`config._attn_implementation` (`GPTJ_ATTENTION_CLASSES = {'eager': GPTJAttention, "
        "'flash_attention_2': GPTJFlashAttention2}`). The engine has one attention op, and the "
        "port follows HF's eager reference, so the table lookup becomes a call of the table's "
        "'eager' class; the other implementations and the table are then unreachable and pruned. A "
        "key computed in a local is resolved the same way when every key of the table names an "
        "attention implementation."
    )
    examples = [
        Example(
            "class Attn(nn.Module):\n    pass\n\n\nclass FlashAttn(Attn):\n    pass\n\n\n"
            'ATTENTION_CLASSES = {"eager": Attn, "flash_attention_2": FlashAttn}\n\n\n'
            "class Block(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.attn = ATTENTION_CLASSES[config._attn_implementation](config)\n",
            "class Attn(nn.Module):\n    pass\n\n\nclass FlashAttn(Attn):\n    pass\n\n\n"
            'ATTENTION_CLASSES = {"eager": Attn, "flash_attention_2": FlashAttn}\n\n\n'
            "class Block(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.attn = Attn(config)\n",
        ),
        Example(  # the key computed in a local (transformers 5.24's Falcon): every table key is an implementation
            "class Attn(nn.Module):\n    pass\n\n\n"
            'ATTENTION_CLASSES = {"eager": Attn, "sdpa": Attn}\n\n\n'
            "class Block(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            '        impl = "flash_attention_2" if flash(config) else config._attn_implementation\n'
            "        self.attn = ATTENTION_CLASSES[impl](config)\n",
            "class Attn(nn.Module):\n    pass\n\n\n"
            'ATTENTION_CLASSES = {"eager": Attn, "sdpa": Attn}\n\n\n'
            "class Block(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            '        impl = "flash_attention_2" if flash(config) else config._attn_implementation\n'
            "        self.attn = Attn(config)\n",
        ),
        Example(  # the class looked up into a local first (transformers 4.45's GPT-2)
            "class Attn(nn.Module):\n    pass\n\n\nclass FlashAttn(Attn):\n    pass\n\n\n"
            'ATTENTION_CLASSES = {"eager": Attn, "flash_attention_2": FlashAttn}\n\n\n'
            "class Block(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        attention_class = ATTENTION_CLASSES[config._attn_implementation]\n"
            "        self.attn = attention_class(config=config)\n",
            "class Attn(nn.Module):\n    pass\n\n\nclass FlashAttn(Attn):\n    pass\n\n\n"
            'ATTENTION_CLASSES = {"eager": Attn, "flash_attention_2": FlashAttn}\n\n\n'
            "class Block(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.attn = Attn(config=config)\n",
        ),
    ]

    def leave_Call(self, original, updated):
        if not self.kept(self.current_class) or not isinstance(updated.func, cst.Subscript):
            return updated
        cls = table_class(self.ctx.idx, updated.func)
        return updated.with_changes(func=cst.Name(cls)) if cls else updated

    def leave_FunctionDef(self, original, updated):
        """`attention_class = TABLE[config._attn_implementation]`, then `attention_class(config)`: the
        local goes, its calls call the eager class."""
        if len(self.scope) == 2 and updated.name.value == "__init__" and self.kept(self.current_class):
            aliases = {}
            for st in updated.body.body:
                if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())],
                                                                      value=m.Subscript())])):
                    local = st.body[0].targets[0].target.value  # type: ignore[attr-defined]
                    if (cls := table_alias(self.ctx.idx, original, local)) is not None:
                        aliases[local] = (st, cls)
            if aliases:
                updated = self._resolve(updated, aliases)
        return super().leave_FunctionDef(original, updated)

    def _resolve(self, fn: cst.FunctionDef, aliases: dict) -> cst.FunctionDef:
        body = [st for st in fn.body.body if all(st is not b for b, _ in aliases.values())]
        fn = fn.with_changes(body=fn.body.with_changes(body=body))
        for local, (_, cls) in aliases.items():
            fn = m.replace(fn, m.Call(func=m.Name(local)),  # type: ignore[assignment]
                           lambda node, _e, c=cls: node.with_changes(func=cst.Name(c)))
        self.mark(f"{self.current_class}.__init__")
        return fn
