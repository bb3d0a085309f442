"""PT003 replace-base-classes: the rule `ReplaceBaseClasses`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, dotted, findall
from porter.passes.base import Example, Rule


class ReplaceBaseClasses(Rule):
    descend_methods = frozenset({"__init__"})
    code = "PT003"
    name = "replace-base-classes"
    why = (
        "Engine modules are plain `nn.Module`s: HF's `PreTrainedModel` subclasses, "
        "`GradientCheckpointingLayer` and `GenerationMixin` bring loading, generation and "
        "checkpointing that the engine does itself. Their class attributes (`_tied_weights_keys`, "
        "`_tp_plan`, `config: XConfig`, ...) and HF-only methods (embedding accessors, "
        "`_init_weights`) go with them; `super().__init__(config)` becomes `super().__init__()`."
    )
    examples = [
        Example(
            "class AModel(APreTrainedModel):\n    _tp_plan = {}\n\n    def __init__(self, config):\n"
            "        super().__init__(config)\n        self.post_init()\n\n"
            "    def get_input_embeddings(self):\n        return self.e\n",
            "class AModel(nn.Module):\n\n    def __init__(self, config):\n        super().__init__()\n",
        )
    ]

    def _hf_base(self, name: str) -> str | None:
        """The replacement for an HF base class, or None when the base is not HF's."""
        last = name.split(".")[-1]
        for hf, repl in self.ctx.table.base_classes.items():
            if last == hf or (hf == "PreTrainedModel" and last.endswith("PreTrainedModel")):
                return repl
        return None

    def leave_ClassDef(self, original, updated):
        super().leave_ClassDef(original, updated)
        if self.scope or not self.kept(updated.name.value):
            return updated
        bases, hf = [], False
        for arg in updated.bases:
            repl = self._hf_base(dotted(arg.value) or "")
            if repl is None:
                bases.append(arg)
                continue
            hf = True
            if repl and all(dotted(b.value) != repl for b in bases):
                bases.append(arg.with_changes(value=cst.parse_expression(repl)))
        if not hf:
            body = [s for s in updated.body.body if not self._hf_method(s)]
            if len(body) == len(updated.body.body):
                return updated
            return updated.with_changes(body=updated.body.with_changes(body=body))
        if bases:
            last = bases[-1]
            bases[-1] = last.with_changes(comma=cst.MaybeSentinel.DEFAULT)
        body = []
        for st in updated.body.body:
            if isinstance(st, cst.SimpleStatementLine) and all(
                isinstance(s, (cst.Assign, cst.AnnAssign)) for s in st.body
            ):
                continue  # HF class attributes
            if self._hf_method(st):
                continue
            body.append(st)
        return updated.with_changes(bases=bases, body=updated.body.with_changes(body=body))

    def _hf_method(self, st) -> bool:
        return isinstance(st, cst.FunctionDef) and st.name.value in self.ctx.table.drop_methods

    def leave_Call(self, original, updated):
        # super().__init__(config) -> super().__init__() in classes that derived from PreTrainedModel
        if m.matches(
            updated,
            m.Call(func=m.Attribute(value=m.Call(func=m.Name("super")), attr=m.Name("__init__"))),
        ) and self.current_function == "__init__" and self.kept(self.current_class):
            cls = self.ctx.idx.classes.get(self.current_class or "")
            if cls and any(self._hf_base(b) for b in cls.bases) and updated.args:
                self._config_arg = updated.args[0].value
                return updated.with_changes(args=[])
        return updated

    def leave_SimpleStatementLine(self, original, updated):
        if self.current_function != "__init__" or not self.kept(self.current_class):
            return updated
        config_arg = getattr(self, "_config_arg", None)
        if config_arg is not None:
            # PreTrainedModel.__init__ stored the config; the port's classes read self.config
            self._config_arg = None
            cls = self.ctx.idx.classes[self.current_class]
            self_config = m.Attribute(value=m.Name("self"), attr=m.Name("config"))
            if findall(cls.node, self_config) and not findall(cls.node, m.AssignTarget(self_config)):
                return cst.FlattenSentinel([updated, cst.parse_statement(f"self.config = {code(config_arg)}\n")])
        t = self.ctx.table
        if m.matches(updated, m.SimpleStatementLine(body=[m.Expr(m.Call(func=m.Attribute(
                value=m.Name("self"), attr=m.Name()))) ])):
            attr = updated.body[0].value.func.attr.value  # type: ignore[attr-defined]
            if attr in t.drop_init_calls:
                return cst.RemoveFromParent()
        if m.matches(updated, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(
                target=m.Attribute(value=m.Name("self"), attr=m.Name()))])])):
            attr = updated.body[0].targets[0].target.attr.value  # type: ignore[attr-defined]
            if attr in t.drop_init_attrs:
                return cst.RemoveFromParent()
        return updated
