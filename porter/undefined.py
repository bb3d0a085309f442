"""The last check of a conversion: a port reads no name, and calls no method of its own, that nothing
defines.

A construct no rule maps can leave a port that reads a name whose definition a rule removed
(transformers 4.45's Mixtral expert loop keeps `batch_size` after the shape unpack that bound it
went). The engine would fail at load or at the first forward; porter refuses at convert instead,
naming the source line where the HF code uses the name. Checked with ruff's undefined-name rule
(F821) on the port's text; and, for a class built on nn.Module alone (or on classes of the port),
every `self.method(...)` it calls must be a method, attribute or submodule the port gives it (remote
code's `self.get_masks(...)`, a method of the HF base class the port does not keep). Static, nothing
imported.
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


# what nn.Module gives every class (the methods a port calls on itself)
_MODULE_MEMBERS = frozenset({
    "forward", "parameters", "named_parameters", "buffers", "named_buffers", "modules", "named_modules",
    "children", "named_children", "register_buffer", "register_parameter", "register_module", "add_module",
    "apply", "to", "float", "half", "double", "cpu", "type", "train", "eval", "state_dict", "load_state_dict",
    "get_submodule", "get_parameter", "get_buffer", "zero_grad", "requires_grad_", "extra_repr", "_apply",
})
_MODULE_BASES = frozenset({"nn.Module", "torch.nn.Module", "Module"})


def _members(cls: ast.ClassDef, classes: dict[str, ast.ClassDef], seen: frozenset[str] = frozenset()) -> set[str] | None:
    """What `self.` can name in CLS: its methods, class attributes, `self.x = ...` bindings, and its bases'
    (None when a base is neither nn.Module nor a class of the port, or the class uses setattr/getattr)."""
    out = set(_MODULE_MEMBERS)
    for base in cls.bases:
        name = ast.unparse(base)
        if name in _MODULE_BASES:
            continue
        if name not in classes or name in seen:
            return None
        inherited = _members(classes[name], classes, seen | {cls.name})
        if inherited is None:
            return None
        out |= inherited
    for node in ast.walk(cls):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "getattr"):
            return None
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" \
                and isinstance(node.ctx, ast.Store):
            out.add(node.attr)
    for st in cls.body:
        targets = st.targets if isinstance(st, ast.Assign) else [st.target] if isinstance(st, ast.AnnAssign) else []
        out |= {t.id for t in targets if isinstance(t, ast.Name)}
    return out


def _missing_methods(tree: ast.Module) -> list[tuple[str, int]]:
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    out = []
    for cls in classes.values():
        members = _members(cls, classes)
        if members is None:
            continue
        for node in ast.walk(cls):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "self" \
                    and node.func.attr not in members:
                out.append((node.func.attr, node.lineno))
    return sorted(out, key=lambda x: x[1])


def check_defined(port_text: str, source_text: str, source_file: str) -> None:
    """Raise a one-line PorterError for the first name the port reads but never defines, or the first
    method of its own it calls that it does not have."""
    tree = ast.parse(port_text)
    methods = _missing_methods(tree)
    if methods:
        name, row = methods[0]
        scope = _scope_at(tree, row)
        line = _source_attr_line(source_text, scope, name)
        raise PorterError(
            f"the port would call `self.{name}(...)`, a method it does not have: it belongs to HF code no rule "
            f"keeps (a base class of HF's, or HF-only plumbing)", file=source_file, line=line,
            construct=".".join(scope))
    missing = _undefined(port_text)
    if not missing:
        return
    name, row = missing[0]
    scope = _scope_at(tree, row)
    line = _source_line(source_text, scope, name)
    where = ".".join(scope) or "module level"
    raise PorterError(
        f"the port would read `{name}`, which nothing in it defines any more: a construct around it is one "
        f"no rule maps (its definition was HF-only plumbing, or a class no rule kept)",
        file=source_file, line=line, construct=where)


def _source_attr_line(source_text: str, scope: list[str], attr: str) -> int | None:
    """The first line in SOURCE_TEXT's SCOPE that calls `self.ATTR(...)`."""
    body: list[ast.stmt] = ast.parse(source_text).body
    node: ast.AST | None = None
    for part in scope:
        node = next((n for n in body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == part), None)
        if node is None:
            break
        body = node.body  # type: ignore[attr-defined]
    if node is None:
        return None
    calls = [n.lineno for n in ast.walk(node) if isinstance(n, ast.Attribute) and n.attr == attr
             and isinstance(n.value, ast.Name) and n.value.id == "self"]
    return min(calls) if calls else node.lineno  # type: ignore[attr-defined]

