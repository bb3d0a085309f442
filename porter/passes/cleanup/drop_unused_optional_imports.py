"""PT062 drop-unused-optional-imports: the rule `DropUnusedOptionalImports`; its `why` says what it
rewrites and why."""

from __future__ import annotations

import libcst as cst

from porter.analysis.cstutil import assigned_names, names_in
from porter.passes.base import Example, Rule

_IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception"}


def _catches_import_error(handler: cst.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    return bool(names_in(handler.type) & _IMPORT_ERRORS)


def _bound(st: cst.BaseStatement) -> set[str] | None:
    """The names an import or a plain assignment line binds; None for any other statement."""
    if not isinstance(st, cst.SimpleStatementLine):
        return None
    out: set[str] = set()
    for small in st.body:
        if isinstance(small, cst.Import):
            out |= {(a.asname.name.value if a.asname else a.evaluated_name.split(".")[0]) for a in small.names}  # type: ignore[union-attr]
        elif isinstance(small, cst.ImportFrom) and not isinstance(small.names, cst.ImportStar):
            out |= {(a.asname.name.value if a.asname else a.evaluated_name) for a in small.names}  # type: ignore[union-attr]
        elif isinstance(small, cst.Assign) and not names_in(small.value) - {"None", "False", "True"}:
            out |= {n for t in small.targets for n in assigned_names(t.target)}
        elif not isinstance(small, cst.Pass):
            return None
    return out


def optional_import_names(node: cst.Try) -> set[str] | None:
    """`try: import X except ImportError: X = None`: the names it binds, or None when NODE is
    anything else (a handler that does more than bind constants, a `finally`, a catch of others)."""
    if node.finalbody is not None or not node.handlers or not all(map(_catches_import_error, node.handlers)):
        return None
    stmts = [*node.body.body, *(s for h in node.handlers for s in h.body.body),
             *(node.orelse.body.body if node.orelse is not None else [])]
    names: set[str] = set()
    for st in stmts:
        bound = _bound(st)
        if bound is None:
            return None
        names |= bound
    return names


class DropUnusedOptionalImports(Rule):
    code = "PT062"
    name = "drop-unused-optional-imports"
    why = (
        "Remote code imports optional kernels at module level inside `try: ... except ImportError:` "
        "(Baichuan's `from xformers import ops as xops`, Qwen-1's flash-attention and rotary "
        "kernels), binding None when they are missing and logging a warning (PT001 drops the log). "
        "The port computes attention with the engine's Attention and keeps none of the arms that "
        "used them, so once every other rule ran, a module-level `try` that only imports and binds "
        "constants, whose names nothing in the port reads, goes: the port imports nothing it does "
        "not use. A `try` whose names are still read stays."
    )
    examples = [
        Example(
            "import torch\n\ntry:\n    from xformers import ops as xops\nexcept ImportError:\n    xops = None\n\n\n"
            "def f(x):\n    return torch.relu(x)\n",
            "import torch\n\n\ndef f(x):\n    return torch.relu(x)\n",
        ),
        # must leave unchanged: the optional kernel is still read by the port
        Example(
            "try:\n    from fast import kernel\nexcept ImportError:\n    kernel = None\n\n\n"
            "def f(x):\n    return x if kernel is None else kernel(x)\n",
            "try:\n    from fast import kernel\nexcept ImportError:\n    kernel = None\n\n\n"
            "def f(x):\n    return x if kernel is None else kernel(x)\n",
        ),
    ]

    @classmethod
    def applies(cls, ctx) -> bool:
        return "ImportError" in ctx.idx.identifiers or "ModuleNotFoundError" in ctx.idx.identifiers

    def leave_Module(self, original, updated):
        body = list(updated.body)
        keep: list[cst.BaseStatement] = []
        for i, st in enumerate(body):
            names = optional_import_names(st) if isinstance(st, cst.Try) else None
            if names:
                rest = [s for j, s in enumerate(body) if j != i]
                if not any(names & names_in(s) for s in rest):
                    continue
            keep.append(st)
        if len(keep) == len(body):
            return updated
        if keep and len(keep) < len(body) and body[0] is not keep[0]:
            keep[0] = keep[0].with_changes(leading_lines=body[0].leading_lines)  # type: ignore[union-attr]
        return updated.with_changes(body=keep)
