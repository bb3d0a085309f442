"""PT242 gather-before-norm: the rule `GatherBeforeNorm`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import self_attr
from porter.errors import PorterError
from porter.passes.base import Example, Rule

_MLP = (
    "from torch import nn\n\n\nclass MLP(nn.Module):\n    def __init__(self, config):\n"
    "        super().__init__()\n"
    "        self.up_proj = ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias=False)\n"
    "        self.sub_norm = RMSNorm(config.intermediate_size, eps=config.rms_norm_eps)\n"
    "        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False{extra})\n\n"
    "    def forward(self, x):\n"
    "        return self.down_proj(self.sub_norm({arg}))[0]\n"
)


class GatherBeforeNorm(Rule):
    descend_methods = frozenset({"__init__", "forward"})
    code = "PT242"
    name = "gather-before-norm"
    why = (
        "A norm over a width that tensor parallelism splits (BitNet's `ffn_sub_norm` over the MLP's "
        "intermediate, `attn_sub_norm` over the attention output, each right before the "
        "row-parallel projection) would see only this rank's part and normalise it with its own "
        "statistics. The port gathers the width from every rank before the norm "
        "(`tensor_model_parallel_all_gather`, in rank order: the column-parallel outputs and the "
        "heads are split in that order), applies the norm to the whole width as HF does, and the "
        "row-parallel projection after it takes the whole width (`input_is_parallel=False`: it "
        "keeps this rank's slice itself). Every rank computes the same full-width norm: exact at "
        "any TP size."
    )
    examples = [Example(
        _MLP.format(extra="", arg="self.up_proj(x)[0]"),
        _MLP.format(extra=", input_is_parallel=False",
                    arg="tensor_model_parallel_all_gather(self.up_proj(x)[0])"),
        seed={"gathered_norms": [("MLP", "sub_norm", "down_proj")]},
    )]

    @classmethod
    def applies(cls, ctx) -> bool:
        return bool(ctx.plan.gathered_norms)

    def _mine(self) -> dict[str, str]:
        return {norm: row for c, norm, row in self.plan.gathered_norms if c == self.current_class}

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        if updated.name.value != "__init__" or len(self.scope) != 1 or not (mine := self._mine_of(cls)):
            return updated
        body, rows = [], set(mine.values())
        for st in updated.body.body:
            target = st.body[0].targets[0].target if m.matches(st, m.SimpleStatementLine(  # type: ignore[attr-defined]
                body=[m.Assign(targets=[m.AssignTarget()], value=m.Call())])) else None
            if target is not None and self_attr(target) in rows:
                call = st.body[0].value  # type: ignore[attr-defined]
                if not m.matches(call.func, m.Name("RowParallelLinear")):
                    raise PorterError(f"the projection after a gathered norm is not row-parallel: {self_attr(target)}",
                                      file=self.ctx.idx.path, rule=self.name)
                arg = cst.Arg(value=cst.Name("False"), keyword=cst.Name("input_is_parallel"),
                              equal=cst.AssignEqual(whitespace_before=cst.SimpleWhitespace(""),
                                                    whitespace_after=cst.SimpleWhitespace("")))
                args = list(call.args)
                args[-1] = args[-1].with_changes(comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" ")))
                st = st.with_changes(body=[st.body[0].with_changes(value=call.with_changes(args=[*args, arg]))])  # type: ignore[attr-defined]
                rows.discard(self_attr(target))
                self.mark(f"{cls}.__init__")
            body.append(st)
        if rows:
            raise PorterError(f"the projection after a gathered norm is not built in __init__: {', '.join(sorted(rows))}",
                              file=self.ctx.idx.path, rule=self.name)
        return updated.with_changes(body=updated.body.with_changes(body=body))

    def _mine_of(self, cls: str | None) -> dict[str, str]:
        return {norm: row for c, norm, row in self.plan.gathered_norms if c == cls}

    def leave_Call(self, original, updated):
        if self.current_function != "forward":
            return updated
        norm = self_attr(updated.func) if isinstance(updated.func, cst.Attribute) else None
        if norm is None or norm not in self._mine() or len(updated.args) != 1:
            return updated
        gather = cst.Call(func=cst.Name(self.ctx.use("tensor_model_parallel_all_gather")),
                          args=[updated.args[0].with_changes(comma=cst.MaybeSentinel.DEFAULT)])
        self.mark(f"{self.current_class}.forward")
        return updated.with_changes(args=[updated.args[0].with_changes(value=gather)])
