"""Find and read the file to port. Static only: the file is read as text, never imported.

The file comes from the installed transformers, a path, or (``transformers_tree``) a release's
wheel fetched with pip into porter's cache, of which only ``transformers/models/**`` and the
checkpoint renamings are unpacked: `convert --transformers`, `regen` and `coverage` read
releases the engine's environment does not have.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from porter.analysis.auto_mappings import read_mappings
from porter.errors import PorterError

MAX_SOURCE_BYTES = 5 * 1024 * 1024  # HF's largest modeling files are ~0.3 MB

# what is unpacked from a release's wheel besides models/**: the checkpoint renamings
TREE_FILES = ("transformers/conversion_mapping.py",)
TREE_LAYOUT = "layout 2: models/** + conversion_mapping.py"


@dataclass(frozen=True)
class Source:
    path: Path
    text: str
    sha256: str
    model_type: str
    rel_path: str  # relative to the transformers package when it lives there
    transformers_version: str
    config_path: Path | None
    causal_lm: str = ""  # the class to port when the folder's auto_map names it (remote code)
    remote: bool = False  # a model repository's code (issue 23): checked, never run


def transformers_root() -> Path | None:
    """The installed transformers package directory, found without importing it."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def installed_transformers_version() -> str:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def resolve(
    src: str,
    *,
    config: str | None = None,
    transformers_dir: Path | None = None,
    transformers_version: str | None = None,
) -> Source:
    """SRC is a modeling file path, or a model_type resolved inside a transformers tree."""
    root = transformers_dir or transformers_root()
    version = transformers_version or (
        installed_transformers_version() if transformers_dir is None else "unknown"
    )
    if not src.strip():
        raise PorterError("SRC is empty: give a modeling_*.py path or a model_type", construct="SRC")
    path = Path(src)
    if path.is_dir() and not src.endswith(".py"):  # a repository's folder (a `modeling_x.py/` is a mistake)
        return resolve_repo(path, config=config, version=version)
    if not src.endswith(".py") and "/" not in src and not path.exists():
        if root is None:
            raise PorterError(f"model type {src!r} given but transformers is not installed")
        cand = root / "models" / src / f"modeling_{src}.py"
        if not cand.is_file():
            # a model type whose module is named otherwise (gemma3_text -> models/gemma3/)
            mod = special_module_names(root).get(src)
            if mod and (root / "models" / mod / f"modeling_{mod}.py").is_file():
                cand = root / "models" / mod / f"modeling_{mod}.py"
        alias = None if cand.is_file() else causal_lm_alias(root, src)
        if alias is not None:
            # a config-only model type: transformers builds another family's causal LM from its
            # config (exaone -> LlamaForCausalLM); the port is that modeling file, under this type
            source = resolve(str(alias), transformers_dir=root, transformers_version=version)
            cfg = root / "models" / src / f"configuration_{src}.py"
            return dataclasses.replace(source, model_type=src, config_path=cfg)
        if not cand.is_file():
            raise PorterError(
                f"unknown model_type {src!r}: no models/{src}/modeling_{src}.py in transformers "
                f"{version}",
                construct="SRC",
            )
        path = cand
    text = read_python(path)
    check_syntax(text, str(path))
    model_type = _model_type_of(path)
    rel = str(path)
    if root is not None:
        try:
            rel = str(path.resolve().relative_to(root.resolve()))
        except ValueError:
            rel = path.name
    cfg = Path(config) if config else path.with_name(f"configuration_{model_type}.py")
    if config:
        check_syntax(read_python(cfg), str(cfg))  # validate early: readable UTF-8 Python
    return Source(
        path=path,
        text=text,
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        model_type=model_type,
        rel_path=rel,
        transformers_version=version,
        config_path=cfg if cfg.is_file() else None,
    )


def resolve_repo(folder: Path, *, config: str | None, version: str) -> Source:
    """A model repository's folder (remote code, porter/remote.py), read statically."""
    from porter import remote

    files = remote.repo_files(folder)
    cfg = Path(config) if config else files.config
    for path in (files.modeling, *([cfg] if cfg else [])):
        check_syntax(read_python(path), str(path))
    causal_lm = remote.causal_lm_class(files.modeling, files.causal_lm)
    for path in (files.modeling, *([cfg] if cfg else [])):
        remote.check_module(path, folder, causal_lm if path == files.modeling else "")
    config_cls, model_type = remote.check_config_class(files.modeling, cfg, causal_lm)
    remote.check_helper_modules(files.modeling, cfg, causal_lm)
    remote.check_repo_config(folder, causal_lm, config_cls, model_type)
    text = read_python(files.modeling)
    return Source(path=files.modeling, text=text, sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
                  model_type=model_type, rel_path=files.modeling.name, transformers_version=version,
                  config_path=cfg, causal_lm=causal_lm, remote=True)


def special_module_names(root: Path) -> dict[str, str]:
    """transformers' SPECIAL_MODEL_TYPE_TO_MODULE_NAME (gemma3_text -> gemma3), read statically."""
    special: dict[str, str] = {}
    for name in ("auto_mappings.py", "configuration_auto.py"):
        path = root / "models" / "auto" / name
        try:
            special.update(read_mappings(path).get("SPECIAL_MODEL_TYPE_TO_MODULE_NAME", {}))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
    return special


def causal_lm_alias(root: Path, model_type: str) -> Path | None:
    """For a model type with a configuration file but no modeling file of its own: the modeling
    file that defines the causal LM transformers' auto table maps it to (read statically)."""
    if not (root / "models" / model_type / f"configuration_{model_type}.py").is_file():
        return None
    try:
        tree = ast.parse((root / "models" / "auto" / "modeling_auto.py").read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    cls = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES" for t in node.targets):
            for t in ast.walk(node.value):
                if isinstance(t, ast.Tuple) and len(t.elts) == 2 and all(
                        isinstance(e, ast.Constant) for e in t.elts) and t.elts[0].value == model_type:
                    cls = t.elts[1].value
    if not isinstance(cls, str):
        return None
    needle = f"\nclass {cls}("
    for path in sorted((root / "models").glob("*/modeling_*.py")):
        try:
            if needle in path.read_text(encoding="utf-8"):
                return path
        except (OSError, UnicodeDecodeError):
            continue
    return None


def _model_type_of(path: Path) -> str:
    stem = path.stem
    return stem[len("modeling_") :] if stem.startswith("modeling_") else stem


def read_python(path: Path) -> str:
    """Read a Python source file as UTF-8 text, with one-line errors for everything else."""
    name = str(path)
    try:
        st = path.stat()  # follows links: a loop raises ELOOP, a dangling link ENOENT
    except FileNotFoundError:
        raise PorterError("no such file", file=name) from None
    except OSError as exc:  # symlink loops, permissions
        raise PorterError(f"cannot read: {exc.strerror or exc}", file=name) from None
    if stat.S_ISDIR(st.st_mode):
        raise PorterError("is a directory, expected a Python file", file=name)
    if not stat.S_ISREG(st.st_mode):
        raise PorterError("not a regular file (a pipe or device?)", file=name)
    size = st.st_size
    if size > MAX_SOURCE_BYTES:
        raise PorterError(
            f"file is {size / 1e6:.1f} MB, larger than any modeling file "
            f"(limit {MAX_SOURCE_BYTES // 2**20} MiB)",
            file=name,
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PorterError(f"cannot read: {exc.strerror or exc}", file=name) from None
    if not raw.strip():
        raise PorterError("file is empty", file=name)
    if b"\x00" in raw:
        raise PorterError("binary file, not Python source", file=name)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PorterError("not UTF-8 text", file=name, line=line) from None


def check_syntax(text: str, name: str) -> None:
    """Parse with Python's own parser (never compiled or run) before libcst sees the text: its
    line numbers are exact, and it refuses nesting that would overflow libcst's native parser."""
    import ast

    try:
        ast.parse(text, filename=name)
    except SyntaxError as exc:
        raise PorterError(f"syntax error: {exc.msg}", file=name, line=exc.lineno) from None
    except (RecursionError, MemoryError):
        raise PorterError("syntax error: expressions nested too deeply to parse", file=name) from None


# -- the transformers tree of a release (its wheel, read statically) ----------------------------


def cache_dir() -> Path:
    if os.environ.get("PORTER_CACHE"):
        return Path(os.environ["PORTER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "porter"


def fetch_wheel(version: str) -> Path:
    """The transformers wheel of VERSION, downloaded with pip once and then kept in the cache."""
    wheels = cache_dir() / "wheels"
    found = sorted(wheels.glob(f"transformers-{version}-*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
         "--disable-pip-version-check", f"transformers=={version}", "-d", str(wheels)],
        capture_output=True, text=True,
    )
    found = sorted(wheels.glob(f"transformers-{version}-*.whl"))
    if proc.returncode != 0 or not found:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines()
                 if ln.strip() and not ln.startswith("WARNING")]
        why = lines[-1].strip() if lines else f"pip exit {proc.returncode}"
        raise PorterError(f"cannot fetch transformers {version}: {why}", construct="--transformers")
    return found[0]


def transformers_tree(version: str) -> Path:
    """A transformers package directory for VERSION: the installed one when it is that version,
    else ``models/**`` and ``conversion_mapping.py`` unpacked from the release's wheel (cached;
    never imported)."""
    if version == installed_transformers_version():
        root = transformers_root()
        if root is not None:
            return root
    dest = cache_dir() / "transformers" / version
    pkg = dest / "transformers"
    marker = dest / ".complete"
    if marker.is_file() and marker.read_text().startswith(f"{TREE_LAYOUT}\n"):
        return pkg
    wheel = fetch_wheel(version)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.new-", dir=dest.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.infolist():
                name = member.filename
                if member.is_dir() or not (name.startswith("transformers/models/") or name in TREE_FILES):
                    continue
                if ".." in Path(name).parts or not name.endswith(".py"):
                    continue
                target = tmp / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(member))
        (tmp / ".complete").write_text(f"{TREE_LAYOUT}\n{wheel.name}\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except (OSError, zipfile.BadZipFile) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PorterError(f"cannot unpack {wheel.name}: {exc}", construct="--transformers") from None
    return pkg
