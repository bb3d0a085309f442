"""Config properties a newer transformers release computes that the engine's release lacks (read
with `ast`, never imported).

A release can turn what the modeling file computed into a property of the config class: 5.25's
Gemma4UnifiedTextConfig.kv_sharing_modes derives each layer's KV-sharing role from
num_kv_shared_layers and layer_types, which the layers then read as `config.kv_sharing_modes`. The
engine reads the checkpoint's config.json with its own transformers' config class, where that
property does not exist (config.json holds only the fields, not what a property computes), so a
port from the newer release reads a missing attribute. What the property computes from the fields
is the port's to compute: rule PT340 writes it as a function of the config.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from porter.analysis.config_source import class_defs


@dataclass(frozen=True)
class ConfigGetter:
    cls: str  # the config class that defines it
    name: str  # the property
    params: str  # the getter's one parameter (self)
    body: str  # the getter's body (source text, dedented to the function's level)
    line: int  # where the getter is, in the source config file
    calls: tuple[str, ...]  # other methods of the config class the getter calls (a property it reads: see reads)
    reads: tuple[str, ...]  # attributes of self the getter reads
    path: str = ""  # the source config file


def _defined(classes: dict[str, ast.ClassDef], cls: str) -> set[str]:
    """Every name a config class (and its in-module bases) defines: class attributes, annotated
    fields, methods and properties, and what its methods assign to self."""
    out: set[str] = set()
    todo, seen = [cls], set()
    while todo:
        name = todo.pop()
        if name in seen or name not in classes:
            continue
        seen.add(name)
        node = classes[name]
        for st in node.body:
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.add(st.name)
                for sub in ast.walk(st):
                    if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store) \
                            and isinstance(sub.value, ast.Name) and sub.value.id == "self":
                        out.add(sub.attr)
                out.update(a.arg for a in st.args.args + st.args.kwonlyargs if st.name == "__init__")
            elif isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
                out.add(st.target.id)
            elif isinstance(st, ast.Assign):
                out.update(t.id for t in st.targets if isinstance(t, ast.Name))
        todo += [b.id for b in node.bases if isinstance(b, ast.Name)]
    return out


def _properties(text: str, tree: ast.Module, cls: str, path: str = "") -> list[ConfigGetter]:
    node = class_defs(tree)[cls]
    lines = text.splitlines()
    out = []
    for st in node.body:
        if not (isinstance(st, ast.FunctionDef) and len(st.decorator_list) == 1
                and isinstance(st.decorator_list[0], ast.Name) and st.decorator_list[0].id == "property"):
            continue
        if len(st.args.args) != 1:
            continue
        me = st.args.args[0].arg
        selfs = [n for n in ast.walk(st) if isinstance(n, ast.Attribute)
                 and isinstance(n.value, ast.Name) and n.value.id == me]
        called = {n.func.attr for n in ast.walk(st) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                  and isinstance(n.func.value, ast.Name) and n.func.value.id == me}
        first = st.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and len(st.body) > 1:
            first = st.body[1]  # the docstring stays with the property
        body = "\n".join(lines[first.lineno - 1: st.end_lineno])
        indent = len(lines[first.lineno - 1]) - len(lines[first.lineno - 1].lstrip())
        body = "\n".join(ln[indent:] if ln.strip() else "" for ln in body.splitlines())
        out.append(ConfigGetter(cls=cls, name=st.name, params=me, body=body, line=st.lineno,
                                  calls=tuple(sorted(called)), reads=tuple(sorted({n.attr for n in selfs} - called)),
                                  path=path))
    return out


def missing_properties(config_path: Path | None, rel_path: str, engine_root: Path | None) -> dict[str, ConfigGetter]:
    """The properties of the source release's config classes that the engine's transformers defines
    the same class without (by name): {property: what it computes}. Empty when the source is the
    engine's own file, or when the engine lacks the class (a day-zero port ships the class whole)."""
    if config_path is None or engine_root is None or "/" not in rel_path:
        return {}
    engine_path = engine_root / Path(rel_path).parent / Path(config_path).name
    try:
        if engine_path.resolve() == Path(config_path).resolve():
            return {}
        text = Path(config_path).read_text(encoding="utf-8")
        tree = ast.parse(text)
        engine = class_defs(ast.parse(engine_path.read_text(encoding="utf-8")))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return {}
    out: dict[str, ConfigGetter] = {}
    for cls in class_defs(tree):
        if cls not in engine:
            continue
        has = _defined(engine, cls)
        for prop in _properties(text, tree, cls, str(config_path)):
            if prop.name not in has:
                out.setdefault(prop.name, prop)
    return out
