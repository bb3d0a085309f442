"""Static facts of a model's configuration file (read with `ast`, never imported): the config
class a causal LM takes, the model_type a config class declares."""

from __future__ import annotations

import ast
from pathlib import Path


def class_defs(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def config_tree(config_path: Path | None) -> ast.Module | None:
    """The configuration file parsed (never imported); None without one, or unreadable."""
    if config_path is None:
        return None
    try:
        return ast.parse(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def config_class_of(model_text: str, causal_lm: str) -> str | None:
    """The config class the causal LM takes: `__init__(self, config: XConfig)`, else `config: XConfig`
    on the class or one of its in-file bases."""
    classes = class_defs(ast.parse(model_text))
    seen: set[str] = set()
    todo = [causal_lm]
    while todo:
        name = todo.pop(0)
        if name in seen or name not in classes:
            continue
        seen.add(name)
        node = classes[name]
        for st in node.body:
            if isinstance(st, ast.FunctionDef) and st.name == "__init__":
                for a in st.args.args:
                    if a.arg == "config" and isinstance(a.annotation, ast.Name):
                        return a.annotation.id
            if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name) \
                    and st.target.id == "config" and isinstance(st.annotation, ast.Name):
                return st.annotation.id
        todo += [b.id for b in node.bases if isinstance(b, ast.Name)]
    return None


def class_model_type(tree: ast.Module, class_name: str) -> str | None:
    classes = class_defs(tree)
    node = classes.get(class_name)
    while node is not None:
        for st in node.body:
            if isinstance(st, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "model_type"
                                                  for t in st.targets):
                if isinstance(st.value, ast.Constant) and isinstance(st.value.value, str):
                    return st.value.value
        bases = [b.id for b in node.bases if isinstance(b, ast.Name) and b.id in classes]
        node = classes[bases[0]] if bases else None
    return None


def config_class_for_type(source) -> str | None:
    """For a config-only model type (its modeling file is another family's): the config class of
    its own configuration file that declares its model_type; None for an ordinary source."""
    if source.config_path is None or Path(source.path).stem == f"modeling_{source.model_type}":
        return None
    tree = config_tree(source.config_path)
    if tree is None:
        return None
    return next((c for c in class_defs(tree) if class_model_type(tree, c) == source.model_type), None)




def causal_lm_model_type(source, causal_lm: str) -> str | None:
    """The model_type of the config class the causal LM takes, read from the source's configuration
    file: `aria_text` for AriaTextForCausalLM in models/aria/ (the text model of a multimodal
    family). transformers keys the checkpoint conversion mapping by it when it loads or saves that
    model, so the port's renamings are read under it too. None when the file does not declare it."""
    cls = config_class_of(source.text, causal_lm)
    if source.config_path is None or cls is None:
        return None
    tree = config_tree(source.config_path)
    if tree is None:
        return None
    return class_model_type(tree, cls) if cls in class_defs(tree) else None


def config_default(source, causal_lm: str, attr: str) -> str | None:
    """The string default the causal LM's config class gives `attr` (`hidden_act: str = "relu2"`, or
    `hidden_act="relu2"` in its `__init__`), read from the source's configuration file; None when
    it gives none or not a string."""
    cls = config_class_of(source.text, causal_lm)
    if source.config_path is None or cls is None:
        return None
    tree = config_tree(source.config_path)
    if tree is None:
        return None
    node = class_defs(tree).get(cls)
    for st in node.body if node else []:
        if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name) and st.target.id == attr \
                and isinstance(st.value, ast.Constant) and isinstance(st.value.value, str):
            return st.value.value
        if isinstance(st, ast.FunctionDef) and st.name == "__init__":
            args = st.args.args[len(st.args.args) - len(st.args.defaults):]
            for a, d in [*zip(args, st.args.defaults), *zip(st.args.kwonlyargs, st.args.kw_defaults)]:
                if a.arg == attr and isinstance(d, ast.Constant) and isinstance(d.value, str):
                    return d.value
    return None


def attribute_aliases(config_path: Path | None) -> dict[str, str]:
    """The config classes' `attribute_map` (a name the model reads -> the field that holds it:
    DBRX's num_hidden_layers -> n_layers), merged over the configuration file's classes; a name two
    classes map differently is left out. Empty without a configuration file."""
    tree = config_tree(config_path)
    if tree is None:
        return {}
    out: dict[str, str] = {}
    clash: set[str] = set()
    for node in class_defs(tree).values():
        for st in node.body:
            if not (isinstance(st, (ast.Assign, ast.AnnAssign)) and isinstance(st.value, ast.Dict)):
                continue
            targets = st.targets if isinstance(st, ast.Assign) else [st.target]
            if not any(isinstance(t, ast.Name) and t.id == "attribute_map" for t in targets):
                continue
            for k, v in zip(st.value.keys, st.value.values):
                if isinstance(k, ast.Constant) and isinstance(k.value, str) \
                        and isinstance(v, ast.Constant) and isinstance(v.value, str):
                    if out.get(k.value, v.value) != v.value:
                        clash.add(k.value)
                    out[k.value] = v.value
    return {k: v for k, v in out.items() if k not in clash}
