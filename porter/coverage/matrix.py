"""The release matrix: every committed model type converted from every release in
``release_matrix`` and ``day_zero_releases`` (rules/coverage.yaml), one row per model type.

Conversion is static (each release's wheel is read, never imported) and only the vllm target is
converted: the rules shared by both targets run there, and a model type whose files are the same
in two releases is converted once. Results are cached under ``.porter-cache/coverage/matrix/``
by porter's fingerprint and the digest of the files read (the modeling file, its model type's
directory, the conversion-mapping entries that can concern it), so an unchanged tree costs a
digest per cell. A model type a release does not have yet (a day-zero port before its release) is "absent", not a failure.
`porter regen` writes the table into DRIFT.md.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
from pathlib import Path

from porter.coverage.cache import Cache, porter_fingerprint
from porter.coverage.common import CACHE_DIR
from porter.errors import PorterError

KIND = "matrix"


def matrix_releases() -> list[str]:
    """release_matrix + day_zero_releases of rules/coverage.yaml, oldest first."""
    import yaml

    from porter.rules_data import COVERAGE_RULES, active_rules_dir, day_zero_releases

    path = active_rules_dir() / COVERAGE_RULES
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError:
        data = {}
    rel = data.get("release_matrix") or []
    if not isinstance(rel, list) or not all(isinstance(v, str) and v.strip() for v in rel):
        raise PorterError("release_matrix must be a list of version strings", file=str(path),
                          construct="release_matrix")
    out = {v.strip() for v in rel} | set(day_zero_releases())
    return sorted(out, key=lambda v: tuple(int(x) if x.isdigit() else 0 for x in v.split(".")))


def _digest(tree: Path, model_type: str) -> str | None:
    """sha256 of what converting MODEL_TYPE from TREE reads; None when the release lacks it."""
    from porter.source import resolve

    try:
        source = resolve(model_type, transformers_dir=tree)
    except PorterError:
        return None
    from porter.analysis.checkpoint_names import mapping_digest_text

    h = hashlib.sha256(model_type.encode())
    files = {source.path}
    for d in {source.path.parent, tree / "models" / model_type}:
        files |= set(d.glob("*.py")) if d.is_dir() else set()
    text = []
    for p in sorted(files):
        if p.is_file():
            data = p.read_bytes()
            h.update(str(p.relative_to(tree)).encode())
            h.update(data)
            text.append(data.decode("utf-8", errors="replace"))
    # of conversion_mapping.py (which changes every release), only what can concern this model
    h.update(mapping_digest_text(tree, model_type, "\n".join(text)).encode())
    return h.hexdigest()


def _cell(model_type: str, release: str, fingerprint: str, cache_dir: Path | None) -> dict:
    from porter.convert import analyse, convert_targets
    from porter.rules_data import get_target
    from porter.source import resolve, transformers_tree

    cache = Cache(cache_dir)
    tree = transformers_tree(release)
    digest = _digest(tree, model_type)
    if digest is None:
        return {"status": "absent"}
    key = hashlib.sha256(f"{fingerprint}:{digest}".encode()).hexdigest()
    hit = cache.get(KIND, key)
    if hit is not None:
        return hit
    try:
        source = resolve(model_type, transformers_dir=tree, transformers_version=release)
        idx, plan = analyse(source)
        convert_targets(source, idx, plan, [get_target("vllm")])
        cell = {"status": "converted"}
    except PorterError as exc:
        cell = {"status": "failed", "error": exc.one_line()}
    cache.put(KIND, key, cell)
    return cell


def release_matrix(model_types: list[str], releases: list[str] | None = None,
                   cache_dir: Path | None = CACHE_DIR, log=lambda msg: None, jobs: int | None = None,
                   known: dict[tuple[str, str], dict] | None = None) -> dict:
    """{"releases": [...], "rows": {model_type: {release: cell}}, "failed": [[model_type, release], ...]}.
    KNOWN: cells the caller already converted ((model_type, release) -> cell; `porter regen`'s own
    conversions of the recorded release and of the one it regenerates from), not converted again."""
    from porter.source import transformers_tree

    releases = matrix_releases() if releases is None else releases
    for r in releases:
        transformers_tree(r)  # a release that cannot be fetched fails once, up front
    fingerprint = porter_fingerprint()
    known = known or {}
    work = [(mt, r) for mt in model_types for r in releases if (mt, r) not in known]
    jobs = max(1, min(jobs or min(2, os.cpu_count() or 1), len(work)))
    args = [[mt for mt, _ in work], [r for _, r in work], [fingerprint] * len(work), [cache_dir] * len(work)]
    if jobs == 1:
        cells = [_cell(*a) for a in zip(*args)]
    else:  # two processes: a conversion is one busy core
        with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
            cells = list(pool.map(_cell, *args, chunksize=4))
    got = {**dict(zip(work, cells)), **{k: v for k, v in known.items() if k[1] in releases}}
    rows: dict[str, dict[str, dict]] = {mt: {} for mt in model_types}
    failed = []
    for mt, r in ((mt, r) for mt in model_types for r in releases):
        cell = got[mt, r]
        rows[mt][r] = cell
        if cell["status"] == "failed":
            failed.append([mt, r])
            log(f"matrix: {mt} from transformers {r}: {cell['error']}")
    return {"releases": releases, "rows": rows, "failed": failed}


def render_matrix_md(matrix: dict) -> list[str]:
    """The per-release table of DRIFT.md: ✓ converts, ✗ fails (the errors listed below), · absent."""
    rel = matrix["releases"]
    lines = ["## Release matrix", "",
             "Every committed model type converted (vllm target) from each release of `release_matrix` "
             "and `day_zero_releases` (rules/coverage.yaml): ✓ converts, ✗ fails, · the release does not "
             "have the model type.", "",
             "| model | " + " | ".join(rel) + " |", "|---|" + "---|" * len(rel)]
    mark = {"converted": "✓", "failed": "✗", "absent": "·"}
    for mt, cells in matrix["rows"].items():
        lines.append(f"| {mt} | " + " | ".join(mark[cells[r]["status"]] for r in rel) + " |")
    counts = {r: sum(1 for c in matrix["rows"].values() if c[r]["status"] == "converted") for r in rel}
    lines.append("| **converted** | " + " | ".join(str(counts[r]) for r in rel) + " |")
    for mt, r in matrix["failed"]:
        lines.append(f"- {mt} from {r}: `{matrix['rows'][mt][r]['error']}`")
    return lines
