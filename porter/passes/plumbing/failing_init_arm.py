"""PT299 failing-init-arm: the rule `FailingInitArm`; its `why` says what it rewrites and why."""

from __future__ import annotations

import json

import libcst as cst
import libcst.matchers as m
from libcst.metadata import MetadataWrapper, PositionProvider

from porter.analysis.cstutil import findall, transform
from porter.passes.attention._common import nlines
from porter.passes.base import Example, Rule, SourceContext

_SRC = (
    "from torch import nn\n\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n"
    "        super().__init__()\n"
    "        if config.pos_emb == 'learned':\n"
    "            self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)\n"
    "            self.init_method(self.position_embeddings.weight)\n"
    "        else:\n            self.wpe = None\n"
    "        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)\n\n"
    "    def forward(self, x):\n        return self.wte(x)\n"
)


def _self_methods_called(block: cst.CSTNode) -> list[str]:
    """`self.NAME(...)` calls in BLOCK, in order."""
    return [c.func.attr.value for c in findall(block, m.Call(func=m.Attribute(value=m.Name("self"))))]  # type: ignore[attr-defined]


class FailingInitArm(Rule):
    code = "PT299"
    name = "failing-init-arm"
    why = (
        "Remote code keeps arms of its time in `__init__` that its own code can no longer run: Qwen-1 "
        "builds a learned position table when `config.pos_emb == 'learned'` and then calls "
        "`self.init_method(...)`, a method no class of the file defines (a Megatron helper it was copied "
        "from). The port's classes are built on `nn.Module` alone, so such an arm could not run in the port "
        "either: its statements go and the arm raises at load, with the file and line, when a config takes "
        "it (the other arm, the one real checkpoints take, stays). Read before indexing, so the index never "
        "sees the sub-modules that arm would build; the source's later lines keep their numbers."
    )
    examples = [
        Example(
            _SRC,
            _SRC.replace(
                "            self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)\n"
                "            self.init_method(self.position_embeddings.weight)\n",
                "            raise NotImplementedError(\"porter: this config takes the arm of AModel.__init__ (source "
                "line 7) that calls self.init_method(...), which no class of the file defines: the port does "
                "not build it\")\n"),
        ),
    ]

    @classmethod
    def applies(cls, ctx) -> bool:
        return True

    def rewrite(self, module: cst.Module) -> cst.Module:
        classes = [st for st in module.body if isinstance(st, cst.ClassDef)]
        self._defined = {f.name.value for c in classes for f in c.body.body if isinstance(f, cst.FunctionDef)}
        self._assigned = {a.target.attr.value for a in findall(module, m.AssignTarget(  # type: ignore[attr-defined]
            m.Attribute(value=m.Name("self"))))}
        self._module, self._pos = module, None  # positions resolved only once an arm is found (rare)
        if not isinstance(self.ctx, SourceContext):
            return super().rewrite(module)
        self.keep_lines = True
        return transform(module, self)

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        if len(self.scope) != 1 or updated.name.value != "__init__" or cls is None:
            return updated
        body = []
        for st, was in zip(updated.body.body, original.body.body):
            missing = None
            if isinstance(st, cst.If) and isinstance(st.orelse, (cst.Else, type(None))):
                missing = next((n for n in _self_methods_called(st.body)
                                if n not in self._defined and n not in self._assigned), None)
            if missing is None:
                body.append(st)
                continue
            if self._pos is None:
                self._pos = MetadataWrapper(self._module, unsafe_skip_copy=True).resolve(PositionProvider)
            line = self._pos[was].start.line if was in self._pos else 0
            why = (f"porter: this config takes the arm of {cls}.__init__ (source line {line}) that calls "
                   f"self.{missing}(...), which no class of the file defines: the port does not build it")
            raise_st = cst.SimpleStatementLine(body=[cst.Raise(exc=cst.Call(
                func=cst.Name("NotImplementedError"), args=[cst.Arg(cst.SimpleString(json.dumps(why)))]))])
            new_body = cst.IndentedBlock(body=[raise_st])
            new = st.with_changes(body=new_body)
            if getattr(self, "keep_lines", False):  # the arm's lines stay as blank lines: later lines keep their numbers
                gone = nlines(st) - nlines(new)
                new = st.with_changes(body=new_body.with_changes(body=[raise_st.with_changes(
                    leading_lines=[cst.EmptyLine()] * max(gone, 0))]))
            body.append(new)
        if all(a is b for a, b in zip(body, updated.body.body)):
            return updated
        self.mark(f"{cls}.__init__")
        return updated.with_changes(body=updated.body.with_changes(body=body))
