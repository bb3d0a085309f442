"""Remote code (issue 23): a model repository's folder, read statically.

A repository ships ``modeling_X.py`` and ``configuration_X.py`` (and maybe helper modules and a
``config.json`` whose ``auto_map`` names the classes), loaded by transformers with
``trust_remote_code=True``. ``porter convert DIR`` reads them as text and never imports or runs
them: the modeling file and the config file come from ``auto_map`` (else the folder's one
``modeling_*.py`` and the config module it imports relatively), the model type from the config
class's ``model_type``, the architecture from ``auto_map["AutoModelForCausalLM"]``.

Code porter would have to run to know what it does is refused, one line naming file:line and
the construct, before anything is written: ``exec``/``eval``/``compile``/``__import__``, a statement
at module level that does something when the module is imported (a call that only reports, to a
logger or the warnings module, does nothing the model reads), an import of a package this
environment does not have, a relative import of a module the folder does not hold, a missing or
mismatched config class, a modeling file with no causal LM. The causal LM class's methods that its
``__init__`` and ``forward`` never reach (``chat``, ``stream_chat``, ``process_response``: chat and
generation helpers) are not read: no port keeps them.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
from pathlib import Path

from porter.analysis.config_source import class_defs, class_model_type, config_class_of
from porter.errors import PorterError

DYNAMIC_CALLS = frozenset({"exec", "eval", "compile", "__import__"})
CAUSAL_AUTO = "AutoModelForCausalLM"


@dataclasses.dataclass(frozen=True)
class RepoFiles:
    modeling: Path
    config: Path | None
    causal_lm: str  # "" when neither auto_map nor the file's naming says


def _auto_map(folder: Path) -> dict[str, str]:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PorterError(f"config.json does not parse: {exc}", file=str(path)) from None
    amap = data.get("auto_map") if isinstance(data, dict) else None
    if amap is None:
        return {}
    if not isinstance(amap, dict) or not all(isinstance(v, (str, list)) for v in amap.values()):
        raise PorterError("auto_map is not an object of \"module.Class\" strings", file=str(path),
                          construct="auto_map")
    # AutoTokenizer maps to a list; a "repo--module.Class" entry names another repository
    return {k: v.split("--")[-1] for k, v in amap.items() if isinstance(v, str)}


def _module_file(folder: Path, ref: str, key: str) -> tuple[Path, str]:
    module, _, cls = ref.rpartition(".")
    path = folder / f"{module.replace('.', '/')}.py"
    if not module or not path.is_file():
        raise PorterError(f"auto_map[{key!r}] names {ref!r}, but the folder has no {module or '?'}.py",
                          file=str(folder / "config.json"), construct="auto_map")
    return path, cls


def repo_files(folder: Path) -> RepoFiles:
    """The modeling file, config file and causal-LM class of a repository folder."""
    amap = _auto_map(folder)
    causal_lm = ""
    if CAUSAL_AUTO in amap:
        modeling, causal_lm = _module_file(folder, amap[CAUSAL_AUTO], CAUSAL_AUTO)
    else:
        found = sorted(folder.glob("modeling_*.py"))
        if len(found) != 1:
            what = "no modeling_*.py" if not found else f"{len(found)} modeling_*.py files"
            raise PorterError(f"{what} and no auto_map[{CAUSAL_AUTO!r}] in config.json: "
                              "cannot tell which file to port", file=str(folder))
        modeling = found[0]
    config = _module_file(folder, amap["AutoConfig"], "AutoConfig")[0] if "AutoConfig" in amap else None
    if config is None:
        config = _relative_config(folder, modeling)
    return RepoFiles(modeling=modeling, config=config, causal_lm=causal_lm)


def _relative_config(folder: Path, modeling: Path) -> Path | None:
    """The configuration module the modeling file imports relatively (`from .configuration_x import
    XConfig`)."""
    tree = ast.parse(modeling.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module \
                and node.module.startswith("configuration_"):
            path = folder / f"{node.module}.py"
            if path.is_file():
                return path
    return None


# -- what porter refuses to read --------------------------------------------------------------------


# Module-level calls that only report (a logger's or the warnings module's): importing the module
# would print, nothing the model computes depends on them, and the port keeps none of them.
LOG_METHODS = frozenset({"debug", "info", "warning", "warn", "warning_once", "error", "critical", "exception",
                         "setLevel", "filterwarnings", "simplefilter"})
LOGGER_FACTORIES = frozenset({"get_logger", "getLogger"})


def _loggers(tree: ast.Module) -> set[str]:
    """Module-level names bound to a logger (`logger = logging.get_logger(__name__)`), plus the
    `warnings` and `logging` modules themselves."""
    names = {"warnings", "logging"}
    for st in tree.body:
        if isinstance(st, ast.Assign) and isinstance(st.value, ast.Call):
            func = st.value.func
            tail = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if tail in LOGGER_FACTORIES:
                names |= {t.id for t in st.targets if isinstance(t, ast.Name)}
    return names


def _reports(call: ast.Call, loggers: set[str]) -> bool:
    """`logger.warning(...)`, `warnings.warn(...)`: a call that only reports."""
    f = call.func
    return isinstance(f, ast.Attribute) and f.attr in LOG_METHODS and isinstance(f.value, ast.Name) and \
        f.value.id in loggers


def _hf_registries(tree: ast.Module) -> set[str]:
    """Names the module imports from transformers and reads nowhere but as the receiver of a
    module-level call (`ALL_LAYERNORM_LAYERS.append(XRMSNorm)`, as transformers 4.x's own files do:
    a class registered in HF's list, which only HF's Trainer reads). Such a call changes nothing the
    model computes; the port drops it with the import (drop-hf-imports)."""
    imported = {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) and n.level == 0
                and (n.module or "").split(".")[0] == "transformers" for a in n.names}
    receivers = {id(st.value.func.value) for st in tree.body if isinstance(st, ast.Expr)
                 and isinstance(st.value, ast.Call) and isinstance(st.value.func, ast.Attribute)
                 and isinstance(st.value.func.value, ast.Name)}
    read_elsewhere = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and id(n) not in receivers}
    return imported - read_elsewhere


def _side_effect(st: ast.stmt, loggers: frozenset[str] | set[str] = frozenset(),
                 registries: frozenset[str] | set[str] = frozenset()) -> str | None:
    """What a module-level statement does when the module is imported, or None for a definition
    (or a call that only reports, to a logger or the warnings module)."""
    if isinstance(st, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                       ast.Assign, ast.AnnAssign, ast.Pass)):
        return None
    if isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant):
        return None  # a docstring
    inner: list[ast.stmt] = []
    if isinstance(st, ast.If):
        inner = [*st.body, *st.orelse]
    elif isinstance(st, ast.Try):
        inner = [*st.body, *st.orelse, *st.finalbody, *(s for h in st.handlers for s in h.body)]
    if isinstance(st, (ast.If, ast.Try)):
        return next((s for s in (_side_effect(x, loggers, registries) for x in inner) if s), None)
    if isinstance(st, ast.Expr) and isinstance(st.value, ast.Call):
        if _reports(st.value, set(loggers)):
            return None
        f = st.value.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in registries:
            return None
        return f"module-level call {ast.unparse(st.value.func)}(...)"
    return f"module-level {type(st).__name__.lower()} statement"


def _installed(top: str) -> bool:
    try:
        return importlib.util.find_spec(top) is not None  # a top-level name: found, never imported
    except (ImportError, ValueError):
        return False


def _check_imports(tree: ast.Module, path: Path, folder: Path, skip: set[int]) -> None:
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            tops = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops = [node.module.split(".")[0]]
        elif isinstance(node, ast.ImportFrom):
            if node.level != 1 or not node.module:
                raise PorterError("relative import outside the folder", file=str(path),
                                  line=node.lineno, construct=f"from {'.' * node.level}{node.module or ''} import")
            if not (folder / f"{node.module.replace('.', '/')}.py").is_file():
                raise PorterError(f"imports .{node.module}, which the folder does not hold",
                                  file=str(path), line=node.lineno, construct=f"from .{node.module} import")
            continue
        else:
            continue
        if _guarded(tree, node):
            continue  # `try: import flash_attn except ImportError:` runs without it
        for top in tops:
            if not _installed(top):
                raise PorterError(f"imports package {top!r}, which is not installed", file=str(path),
                                  line=node.lineno, construct=f"import {top}")


def _guarded(tree: ast.Module, node: ast.stmt) -> bool:
    """NODE sits in the body of a `try` whose handlers catch ImportError (or everything)."""
    for t in ast.walk(tree):
        if isinstance(t, ast.Try) and any(n is node for s in t.body for n in ast.walk(s)):
            for h in t.handlers:
                names = {ast.unparse(h.type)} if h.type is not None else {"*"}
                if names & {"*", "ImportError", "ModuleNotFoundError", "Exception"} or \
                        any("ImportError" in n for n in names):
                    return True
    return False


def hf_api_methods(tree: ast.Module, causal_lm: str) -> list[ast.FunctionDef]:
    """The methods of the causal LM class the model does not compute with: neither `__init__` nor
    `forward` reaches them through `self.NAME` (a chat or streaming helper, a response parser).
    The port keeps none of them (porter writes the causal LM class's methods itself)."""
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == causal_lm), None)
    if cls is None:
        return []
    methods = {n.name: n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    seen: set[str] = set()
    todo = [n for n in ("__init__", "forward") if n in methods]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(methods[name]):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" \
                    and node.attr in methods:
                todo.append(node.attr)
    return [fn for name, fn in methods.items() if name not in seen]  # type: ignore[misc]


def check_module(path: Path, folder: Path, causal_lm: str = "") -> None:
    """Refuse remote code porter would have to run to read (one line, file:line, the construct).
    The causal LM class's chat and generation helpers (`hf_api_methods`) are not read: no port keeps them."""
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text, filename=str(path))
    skip = {id(n) for fn in hf_api_methods(tree, causal_lm) for n in ast.walk(fn)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in DYNAMIC_CALLS:
            raise PorterError(f"{node.func.id}() runs code porter cannot read statically", file=str(path),
                              line=node.lineno, construct=f"{node.func.id}(...)")
    loggers, registries = _loggers(tree), _hf_registries(tree)
    for st in tree.body:
        what = _side_effect(st, loggers, registries)
        if what is not None:
            raise PorterError(f"{what}: importing the module would do something (porter never runs it)",
                              file=str(path), line=st.lineno, construct=ast.unparse(st).splitlines()[0][:60])
    _check_imports(tree, path, folder, skip)


def check_helper_modules(modeling: Path, config: Path | None, causal_lm: str) -> None:
    """Refuse a causal LM whose classes (or the module functions they call) call a class or function
    the modeling file imports from another module of the folder (MPT's `from .blocks import
    MPTBlock`, `from .custom_embedding import SharedEmbedding`): porter ports the modeling file alone.
    Calls in the causal LM's chat and generation helpers (`hf_api_methods`) do not count."""
    tree = ast.parse(modeling.read_text(encoding="utf-8"), filename=str(modeling))
    config_module = config.stem if config is not None else ""
    # module-level imports (an import inside a method belongs to its arm: Baichuan2's quantizer)
    local = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(fn)}
    foreign = {(a.asname or a.name): n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
               and id(n) not in local and n.level == 1 and n.module and n.module != config_module for a in n.names}
    if not foreign:
        return
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    skip = {id(n) for fn in hf_api_methods(tree, causal_lm) for n in ast.walk(fn)}
    seen, todo, hits = set(), [causal_lm], []
    while todo:
        name = todo.pop()
        if name in seen or name not in defs:
            continue
        seen.add(name)
        for node in ast.walk(defs[name]):
            if id(node) in skip or not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                continue
            callee = node.func.id
            if callee in foreign:
                hits.append((node.lineno, callee, name))
            elif callee in defs:
                todo.append(callee)
    if hits:
        line, callee, where = min(hits)
        raise PorterError(f"{callee} comes from the folder's {foreign[callee]}.py: porter ports the modeling "
                          "file alone and does not read the classes and functions it imports from the folder's "
                          "other modules", file=str(modeling), line=line, construct=f"{where}: {callee}(...)")


def check_config_class(modeling: Path, config: Path | None, causal_lm: str) -> tuple[str, str]:
    """(config class, model_type) the causal LM takes, from the config module: refused when missing
    or mismatched."""
    cls = config_class_of(modeling.read_text(encoding="utf-8"), causal_lm)
    if config is None:
        raise PorterError(f"no configuration module for {causal_lm} (no auto_map['AutoConfig'], no "
                          "relative import of a configuration_*.py)", file=str(modeling),
                          construct="config class")
    tree = ast.parse(config.read_text(encoding="utf-8"))
    classes = class_defs(tree)
    if cls is None:  # `config_class = XConfig` on the pretrained base
        cls = _config_class_attr(modeling)
    if cls is None or cls not in classes:
        raise PorterError(f"{causal_lm} takes config class {cls or '?'}, which {config.name} does not define",
                          file=str(modeling), construct="config class")
    model_type = class_model_type(tree, cls)
    if not model_type:
        node = classes[cls]
        raise PorterError(f"config class {cls} declares no model_type", file=str(config),
                          line=node.lineno, construct=f"class {cls}")
    return cls, model_type


def _json_line(path: Path, key: str) -> int | None:
    """The line of config.json where KEY is first written (for the diagnostic)."""
    needle = json.dumps(key) + ":"
    lines = path.read_text(encoding="utf-8").splitlines()
    return next((i for i, ln in enumerate(lines, 1) if needle in ln.replace('" :', '":')), None)


def check_repo_config(folder: Path, causal_lm: str, config_cls: str, model_type: str) -> None:
    """config.json agrees with the config class the causal LM takes: auto_map['AutoConfig'] names
    that class, and a model_type it records is the class's (else transformers would build another)."""
    path = folder / "config.json"
    named = _auto_map(folder).get("AutoConfig", "").rpartition(".")[2]
    if named and named != config_cls:
        raise PorterError(f"auto_map['AutoConfig'] names {named}, but {causal_lm} takes config class {config_cls}",
                          file=str(path), line=_json_line(path, "AutoConfig"), construct="auto_map")
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    written = data.get("model_type") if isinstance(data, dict) else None
    if written is not None and written != model_type:
        raise PorterError(f"config.json's model_type {written!r} is not {config_cls}'s {model_type!r}",
                          file=str(path), line=_json_line(path, "model_type"), construct="model_type")


def _config_class_attr(modeling: Path) -> str | None:
    tree = ast.parse(modeling.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "config_class"
                                                for t in node.targets) and isinstance(node.value, ast.Name):
            return node.value.id
    return None


def causal_lm_class(modeling: Path, named: str) -> str:
    """The causal LM: auto_map's class (which the file must define), else the file's one
    `*ForCausalLM` / `*LMHeadModel` class."""
    classes = class_defs(ast.parse(modeling.read_text(encoding="utf-8")))
    if named:
        if named not in classes:
            raise PorterError(f"auto_map names causal LM {named}, which the file does not define",
                              file=str(modeling), construct=CAUSAL_AUTO)
        return named
    found = [n for n in classes if n.endswith("ForCausalLM")] or [n for n in classes if n.endswith("LMHeadModel")]
    if len(found) != 1:
        raise PorterError("no causal LM: no auto_map['AutoModelForCausalLM'] and "
                          f"{'no' if not found else 'more than one'} *ForCausalLM/*LMHeadModel class",
                          file=str(modeling), construct="causal LM")
    return found[0]


# -- the recorded source of a remote-code port ----------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
SOURCE_SUFFIXES = (".py",)


def source_files(folder: Path) -> list[Path]:
    """The files of a repository folder a reference loads: its Python modules and config.json."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and (p.suffix in SOURCE_SUFFIXES or p.name == "config.json"))


def recorded(folder: Path) -> dict:
    """What PORT.json records of a remote port's source: the folder (relative to porter's
    repository when it is inside it) and the sha256 of each of its source files."""
    import hashlib

    folder = Path(folder).resolve()
    try:
        where = folder.relative_to(REPO).as_posix()
    except ValueError:
        where = str(folder)
    return {"folder": where,
            "files": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in source_files(folder)}}


def recorded_folder(remote: dict) -> Path:
    folder = Path(remote["folder"])
    return folder if folder.is_absolute() else REPO / folder


def changed_sources(remote: dict) -> list[str]:
    """The recorded source files that are missing or differ now (the port came from other code)."""
    import hashlib

    folder = recorded_folder(remote)
    now = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in source_files(folder)} \
        if folder.is_dir() else {}
    was = remote.get("files") or {}
    return sorted(n for n in set(was) | set(now) if was.get(n) != now.get(n))
