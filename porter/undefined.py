"""The last check of a conversion: a port reads no name that nothing defines.

A construct no rule maps can leave a port that reads a name whose definition a rule removed
(transformers 4.45's Mixtral expert loop keeps `batch_size` after the shape unpack that bound it
went). The engine would fail at load or at the first forward; porter refuses at convert instead,
naming the source line where the HF code uses the name. Checked with ruff's undefined-name rule
(F821) on the port's text: static, nothing imported.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from porter.errors import PorterError


def _undefined(text: str) -> list[tuple[str, int]]:
    exe = Path(sys.executable).with_name("ruff")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "ruff"]
    proc = subprocess.run([*cmd, "check", "--isolated", "--no-cache", "--select", "F821", "--output-format", "json",
                           "--exit-zero", "-"], input=text, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PorterError(f"generated code does not parse: {proc.stderr.strip().splitlines()[-1:]}")
    out = []
    for d in json.loads(proc.stdout or "[]"):
        name = d["message"].split("`")[1] if "`" in d["message"] else d["message"]
        out.append((name, d["location"]["row"]))
    return out


def _scope_at(tree: ast.Module, row: int) -> list[str]:
    """Class / function names enclosing line ROW, outermost first."""
    path: list[str] = []
    body = tree.body
    while True:
        for node in body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.lineno <= row <= (node.end_lineno or row):
                path.append(node.name)
                body = node.body
                break
        else:
            return path


def _source_line(source_text: str, scope: list[str], name: str) -> int | None:
    """The first line in SOURCE_TEXT's SCOPE (same class / function names) that reads NAME."""
    body: list[ast.stmt] = ast.parse(source_text).body
    node: ast.AST | None = None
    for part in scope:
        node = next((n for n in body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == part), None)
        if node is None:
            break
        body = node.body  # type: ignore[attr-defined]
    if node is None:
        return None
    reads = [n.lineno for n in ast.walk(node) if isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load)]
    return min(reads) if reads else node.lineno  # type: ignore[attr-defined]


def check_defined(port_text: str, source_text: str, source_file: str) -> None:
    """Raise a one-line PorterError for the first name the port reads but never defines."""
    missing = _undefined(port_text)
    if not missing:
        return
    name, row = missing[0]
    scope = _scope_at(ast.parse(port_text), row)
    line = _source_line(source_text, scope, name)
    where = ".".join(scope) or "module level"
    raise PorterError(
        f"the port would read `{name}`, which nothing in it defines any more: a construct around it is one "
        f"no rule maps (its definition was HF-only plumbing, or a class no rule kept)",
        file=source_file, line=line, construct=where)
