"""Issue 20's limits on porter's own code: no module in porter/ over 600 lines, no function or
method over 80 (from its first decorator to its last line)."""

from __future__ import annotations

import ast

from conftest import ROOT

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def test_no_module_over_600_lines_and_no_function_over_80():
    too_long = []
    for path in sorted((ROOT / "porter").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT)
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{rel}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                size = node.end_lineno - start + 1
                if size > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{node.lineno}: {node.name} is {size} lines")
    assert not too_long, "\n".join(too_long)
