"""transformers' auto tables (``models/auto/*.py``), read statically: never imported.

``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, ``SPECIAL_MODEL_TYPE_TO_MODULE_NAME`` and their kin are
literal tables of string pairs; `porter coverage` lists the zoo from them and `porter convert
gemma3_text` resolves a model type to its folder with them.
"""

from __future__ import annotations

import ast
from pathlib import Path


def _literal_pairs(node: ast.AST) -> list[tuple[str, str]] | None:
    """``OrderedDict([("a", "B"), ...])`` or ``{"a": "B"}`` -> pairs of string constants."""
    if isinstance(node, ast.Call) and node.args:
        node = node.args[0]
    pairs: list[tuple[str, str]] = []
    if isinstance(node, ast.List):
        for elt in node.elts:
            if (isinstance(elt, ast.Tuple) and len(elt.elts) == 2
                    and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in elt.elts)):
                pairs.append((elt.elts[0].value, elt.elts[1].value))
        return pairs
    if isinstance(node, ast.Dict):
        for k, v in zip(node.keys, node.values):
            if isinstance(k, ast.Constant) and isinstance(v, ast.Constant):
                pairs.append((k.value, v.value))
        return pairs
    return None


def read_mappings(path: Path) -> dict[str, dict[str, str]]:
    """Every top-level ``NAME = OrderedDict([...])`` / ``NAME = {...}`` of string pairs in PATH."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            pairs = _literal_pairs(node.value)
            if pairs is not None:
                out.setdefault(node.targets[0].id, {}).update(pairs)
        # NAME.update({...}) extends a mapping
        elif (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
              and isinstance(node.value.func, ast.Attribute) and node.value.func.attr == "update"
              and isinstance(node.value.func.value, ast.Name) and node.value.args):
            pairs = _literal_pairs(node.value.args[0])
            if pairs is not None:
                out.setdefault(node.value.func.value.id, {}).update(pairs)
    return out


def module_name(model_type: str, special: dict[str, str]) -> str:
    """transformers' own rule (model_type_to_module_name), applied to the static table."""
    return special.get(model_type, model_type.replace("-", "_"))
