"""Checkpoint names that differ from the module tree, read statically from transformers.

transformers 5 renames some checkpoint keys when loading (`conversion_mapping.py`:
`WeightRenaming(source_patterns=r"^embed_out\\.", target_patterns="lm_head.")` for GPT-NeoX), and
writes the old names back when saving. The port's modules carry the in-memory names, so its
`load_weights` applies the same renamings. Only plain renamings are read; the file is parsed,
never imported.
"""

from __future__ import annotations

import ast
from pathlib import Path


def weight_renamings(transformers_dir: Path | None, keys: list[str]) -> list[tuple[str, str]]:
    """(source regex, target) pairs registered under any of `keys` (model_type, class name)."""
    if transformers_dir is None:
        return []
    path = transformers_dir / "conversion_mapping.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return []
    out: list[tuple[str, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Dict):
            continue
        for key, value in zip(node.keys, node.values):
            if not (isinstance(key, ast.Constant) and key.value in keys and isinstance(value, ast.List)):
                continue
            for call in value.elts:
                if not (isinstance(call, ast.Call) and getattr(call.func, "id", None) == "WeightRenaming"):
                    continue
                kw = {k.arg: k.value for k in call.keywords}
                args = list(call.args) + [kw.get("source_patterns"), kw.get("target_patterns")][len(call.args):]
                src, dst = (args + [None, None])[:2]
                if isinstance(src, ast.Constant) and isinstance(dst, ast.Constant) \
                        and isinstance(src.value, str) and isinstance(dst.value, str):
                    out.append((src.value, dst.value))
    return out
