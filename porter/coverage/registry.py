"""vLLM's own registry, read statically (``ast``; vLLM is not imported): for each architecture,
whether vLLM has a model file of its own, serves it through its Transformers backend, or dropped it."""

from __future__ import annotations

import ast
from pathlib import Path


class _Registry(dict):
    """arch -> entry; an HF class name that vLLM spells differently (PhimoeForCausalLM /
    PhiMoEForCausalLM) is found case-insensitively and the entry names vLLM's spelling."""

    def get(self, arch, default=None):
        if arch in self:
            return self[arch]
        for k, v in self.items():
            if k.lower() == str(arch).lower():
                return {**v, "detail": f"{v['detail']} (as {k})"}
        return default


def vllm_registry(vllm_root: Path | None) -> dict[str, dict]:
    """arch -> {"kind": native|transformers-backend|dropped, ...} from vLLM's registry.py (ast)."""
    if vllm_root is None:
        return {}
    path = vllm_root / "model_executor" / "models" / "registry.py"
    if not path.is_file():
        return {}
    tree = ast.parse(path.read_text(encoding="utf-8"))
    tables: dict[str, dict] = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Dict)):
            tab = {}
            for k, v in zip(node.value.keys, node.value.values):
                if isinstance(k, ast.Constant):
                    try:
                        tab[k.value] = ast.literal_eval(v)
                    except ValueError:
                        pass
            tables[node.targets[0].id] = tab
    out: _Registry = _Registry()
    for arch, ver in tables.get("_PREVIOUSLY_SUPPORTED_MODELS", {}).items():
        out[arch] = {"kind": "dropped", "detail": f"dropped in vLLM {ver}"}
    for arch, (mod, cls) in tables.get("_TRANSFORMERS_SUPPORTED_MODELS", {}).items():
        out[arch] = {"kind": "transformers-backend", "detail": f"Transformers backend ({cls})"}
    for arch, (mod, cls) in tables.get("_TEXT_GENERATION_MODELS", {}).items():
        if mod.startswith("vllm."):
            f = vllm_root.parent.joinpath(*mod.split(".")).with_suffix(".py")
            if not f.is_file():
                f = vllm_root.parent.joinpath(*mod.split(".")) / "__init__.py"
        else:
            f = path.parent / f"{mod}.py"
        rel = str(f.relative_to(vllm_root.parent)) if f.exists() else f"{mod} (missing)"
        out[arch] = {"kind": "native", "detail": f"{rel}:{cls}", "file_exists": f.exists()}
    return out
