"""What the attention rules share: the base of the rules that run before indexing; line counts."""

from __future__ import annotations

from typing import ClassVar

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import findall, transform
from porter.passes.base import Rule, SourceContext


def nlines(node: cst.CSTNode) -> int:
    """Source lines a statement spans, with its leading comments and blank lines."""
    return len(cst.Module(body=[]).code_for_node(node).splitlines())


def in_place_of(replaced: cst.CSTNode, body: list[cst.BaseStatement], keep_lines: bool) -> list[cst.BaseStatement]:
    """`body` (the statements of the arm that stays) put where `replaced` stood: with keep_lines the
    removed lines become blank lines before the arm, else the arm takes `replaced`'s leading lines."""
    body = list(body)
    if keep_lines:
        gone = nlines(replaced) - sum(nlines(st) for st in body)
        body[0] = body[0].with_changes(leading_lines=[*([cst.EmptyLine()] * gone), *body[0].leading_lines])
    else:
        body[0] = body[0].with_changes(leading_lines=replaced.leading_lines)
    return body


class BeforeIndexRule(Rule):
    """A rule that also runs on the parsed source before it is indexed (pipeline.BEFORE_INDEX), so
    the index sees the engine's form of the attention (one call instead of inline math, one arm of
    a branch). There it keeps the source's line numbers (removed lines become blank lines) and walks
    only the top-level classes and functions that name its `word` (in any case: `nn.Softmax`). With a full context (its
    examples), it is an ordinary rule that applies where its word occurs."""

    word: ClassVar[str] = ""
    keep_lines = False  # True before indexing: later lines keep their number

    @classmethod
    def applies(cls, ctx) -> bool:
        if isinstance(ctx, SourceContext):
            # they run on a file that computes attention inline or branches on the implementation
            return "softmax" in ctx.text.lower() or "_attn_implementation" in ctx.text
        return any(i.lower() == cls.word for i in ctx.idx.identifiers)  # `softmax` or `nn.Softmax`

    def rewrite(self, module: cst.Module) -> cst.Module:
        if not isinstance(self.ctx, SourceContext):
            return super().rewrite(module)
        self.keep_lines = True
        # a rule keeps its state per class: statements that never name its word are not walked
        body: list[cst.CSTNode] = []
        for st in module.body:
            names = findall(st, m.Name())
            if not any(n.value.lower() == self.word for n in names):  # type: ignore[attr-defined]
                body.append(st)
                continue
            new = transform(st, self)
            if isinstance(new, cst.FlattenSentinel):
                body.extend(new.nodes)
            elif not isinstance(new, cst.RemovalSentinel):
                body.append(new)
        return module.with_changes(body=body)
