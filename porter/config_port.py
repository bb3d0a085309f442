"""Day-zero ports: ship the HF config class with the port when the engine's transformers lacks it.

A model type added in a newer transformers release than the engine pins has no config class in
the engine's environment, so the engine cannot even read its ``config.json``. The release's
``configuration_<model_type>.py`` is read statically (never imported), cut down to the config class
the causal LM takes (and the in-module classes it derives from), its imports rewritten to absolute
imports of the engine's transformers — each imported name checked to exist there, statically —
and written into the port as ``configuration_<model_type>.py``. The plugin's ``register()`` hands it
to ``AutoConfig.register`` before the engine reads the checkpoint's config.

Rules PT141 (config-engine-imports) and PT142 (config-keep-class), in porter/passes/config/ and run
by the pipeline's runner (its CONFIG stage), do the rewriting; a name the
engine's transformers does not have is a one-line error with the config file's line.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import libcst as cst

from porter.analysis.config_source import class_defs, class_model_type, config_class_of
from porter.analysis.filecache import derived
from porter.errors import PorterError
from porter.passes.config._common import ConfigContext
from porter.passes.config.config_engine_imports import ConfigEngineImports
from porter.passes.pipeline import CONFIG, run


@dataclass
class ShippedConfig:
    class_name: str  # e.g. Apertus1p5TextConfig
    model_type: str  # e.g. apertus1p5_text (what config.json names)
    module_name: str  # e.g. configuration_apertus1p5
    text: str  # the rewritten module


# -- static facts ---------------------------------------------------------------------------------


def engine_knows_model_type(engine_root: Path | None, model_type: str) -> bool:
    """The engine's transformers maps MODEL_TYPE to a config class (its auto tables, read statically)."""
    if engine_root is None:
        return False
    for name in ("auto_mappings.py", "configuration_auto.py"):
        path = engine_root / "models" / "auto" / name
        if model_type in derived(path, _config_model_types, frozenset()):
            return True
    return False


def _config_model_types(tree: ast.Module) -> frozenset[str]:
    """Model types an auto table maps to a `*Config` class (the engine's data, not the file being
    ported: read once per process and version of the file)."""
    return frozenset(
        node.elts[0].value for node in ast.walk(tree)
        if isinstance(node, ast.Tuple) and len(node.elts) == 2 and all(
            isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts)
        and node.elts[1].value.endswith("Config")
    )


def _module_names(path: Path) -> set[str] | None:
    """Names a module binds at top level (through if/try blocks too), read statically."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    out: set[str] = set()

    def walk(body):
        for st in body:
            if isinstance(st, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                out.add(st.name)
            elif isinstance(st, ast.Assign):
                out.update(t.id for t in st.targets if isinstance(t, ast.Name))
            elif isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
                out.add(st.target.id)
            elif isinstance(st, (ast.Import, ast.ImportFrom)):
                out.update((a.asname or a.name).split(".")[0] for a in st.names)
            elif isinstance(st, ast.If):
                walk(st.body)
                walk(st.orelse)
            elif isinstance(st, ast.Try):
                walk(st.body)
                for h in st.handlers:
                    walk(h.body)
                walk(st.orelse)
    walk(tree.body)
    return out


def engine_has(engine_root: Path | None, module: str, name: str) -> bool:
    """`from MODULE import NAME` works under the engine's transformers (checked without importing)."""
    if not module.startswith("transformers"):
        return True  # not transformers' business (torch, huggingface_hub, typing): same environment
    if engine_root is None:
        return False
    rel = module.split(".")[1:]
    base = engine_root.joinpath(*rel)
    if (base / name).is_dir() or base.joinpath(f"{name}.py").is_file():
        return True  # a submodule
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            names = _module_names(path)
            return names is not None and name in names
    return False




# -- shipping -------------------------------------------------------------------------------------


def ship_config(source, causal_lm: str, engine_root: Path | None) -> ShippedConfig | None:
    """The rewritten config module for a port, or None when the engine's transformers already
    knows the config's model_type (then nothing is shipped)."""
    if source.config_path is None:
        return None
    cfg_path = Path(source.config_path)
    text = cfg_path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    classes = class_defs(tree)
    if all(engine_knows_model_type(engine_root, t) for c in classes
           if (t := class_model_type(tree, c)) is not None):
        return None  # the engine knows every model_type the file declares: the usual case
    cls = config_class_of(source.text, causal_lm)
    if cls is None or cls not in classes:
        # a config-only model type (exaone -> LlamaForCausalLM): the class of its own model_type
        cls = next((c for c in classes if class_model_type(tree, c) == source.model_type), None)
        if cls is None:
            return None
    model_type = class_model_type(tree, cls)
    if model_type is None or engine_knows_model_type(engine_root, model_type):
        return None
    keep, todo = set(), [cls]
    while todo:  # the class and its in-module bases
        name = todo.pop()
        if name in keep or name not in classes:
            continue
        keep.add(name)
        todo += [b.id for b in classes[name].bases if isinstance(b, ast.Name)]
    rel_pkg = source.rel_path.rsplit("/", 1)[0].replace("/", ".") if "/" in source.rel_path else "models.x"
    ctx = ConfigContext(keep=keep, engine_root=engine_root, module_package=f"transformers.{rel_pkg}")
    out = run(CONFIG, cst.parse_module(text), ctx, path=str(cfg_path)).code
    # every name the shipped module imports from transformers must exist in the engine's
    lines = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                lines.setdefault(a.asname or a.name, node.lineno)
    for node in ast.parse(out).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if not engine_has(engine_root, node.module, a.name):
                    raise PorterError(
                        f"the shipped config imports {a.name} from {node.module}, which the engine's "
                        "transformers does not have",
                        file=str(cfg_path), line=lines.get(a.asname or a.name),
                        rule=ConfigEngineImports.name,
                    )
    return ShippedConfig(class_name=cls, model_type=model_type,
                         module_name=cfg_path.stem, text=out)
