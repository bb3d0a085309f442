"""`run_coverage`: the lists (the installed transformers and each day-zero release), their
conversions (parallel, cached), one row per kept model type, the verifications, the report."""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path

from porter.coverage.cache import Cache, convert_key, files_digest, porter_fingerprint, verify_key
from porter.coverage.common import (
    CACHE_DIR,
    COVERAGE_JSON,
    COVERAGE_MD,
    TARGETS,
    Log,
    day_zero_releases,
    dist_version,
    package_dir,
    progress,
)
from porter.coverage.discover import Candidate, discover
from porter.coverage.markdown import render_md
from porter.coverage.registry import vllm_registry
from porter.coverage.summary import build_report, day_zero_section, final_status
from porter.coverage.verify_rows import from_verdict, previous_verifications, settled, verify_rows
from porter.coverage.worker import complete, convert_task


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
    tf_root = tf_root or package_dir("transformers")
    if tf_root is None:
        raise PorterError("transformers is not installed: nothing to sweep", construct="porter coverage")
    releases = day_zero_releases() if day_zero is None else list(day_zero)
    registry = vllm_registry(package_dir("vllm"))
    cands, dz = _lists(tf_root, releases, only)
    kept = [c for c in cands if c.excluded is None]
    cache = Cache(cache_dir)
    sweep = Sweep(out, registry, cache, porter_fingerprint(), load_rules(),
                  previous_verifications(out / COVERAGE_JSON), jobs, log)

    # 1. convert (parallel, cached), 2. rows, committed ports, carried-over verifications
    rows, conv = sweep.section(kept, tf_root, None, "coverage")
    dz_rows: dict[str, list[dict]] = {}
    dz_timings: dict[str, dict] = {}
    for rel, (tree, cs) in dz.items():
        dz_rows[rel], dz_timings[rel] = sweep.section([c for c in cs if c.excluded is None], tree, rel,
                                                      f"day zero {rel}")
    all_rows = rows + [r for rs in dz_rows.values() for r in rs]
    # 3. verify (sequential: the engine uses both cores)
    verify_s = verify_rows(all_rows, out, cache, cache_dir, log) if verify else 0.0
    for row in all_rows:
        row.pop("_vkey", None)
        row["status"] = final_status(row)

    report = build_report(cands, rows, sweep.fingerprint,
                          timings={"convert_s": conv["convert_s"], "verify_s": verify_s,
                                   "total_s": round(time.time() - t_start, 1), "jobs": jobs,
                                   "converted_fresh": conv["converted_fresh"],
                                   "converted_cached": conv["converted_cached"]},
                          partial=bool(only))
    report["day_zero_releases"] = releases
    installed_version = dist_version("transformers")
    report["day_zero"] = [
        day_zero_section(rel, dz[rel][0], dz[rel][1], dz_rows[rel], installed_version, dz_timings[rel])
        for rel in dz
    ]
    if write:
        out.mkdir(parents=True, exist_ok=True)
        (out / COVERAGE_JSON).write_text(json.dumps(report, indent=2) + "\n")
        (out / COVERAGE_MD).write_text(render_md(report))
    return report


def _lists(tf_root: Path, releases: list[str], only: list[str] | None
           ) -> tuple[list[Candidate], dict[str, tuple[Path, list[Candidate]]]]:
    """The installed transformers' candidates, and for each day-zero release its tree and the
    candidates whose model type the installed one lacks; both cut to ONLY when given."""
    from porter.errors import PorterError
    from porter.source import transformers_tree

    all_cands = discover(tf_root)
    installed_types = {c.model_type for c in all_cands}
    installed_version = dist_version("transformers")
    dz_all: dict[str, tuple[Path, list[Candidate]]] = {}
    for rel in releases:
        if rel == installed_version:
            continue
        tree = transformers_tree(rel)
        dz_all[rel] = (tree, [c for c in discover(tree, day_zero=True) if c.model_type not in installed_types])
    if not only:
        return all_cands, dz_all
    known = installed_types | {c.model_type for _, cs in dz_all.values() for c in cs}
    unknown = [m for m in only if m not in known]
    if unknown:
        raise PorterError(f"not in the causal-LM auto mapping: {', '.join(unknown)}",
                          construct="porter coverage --only")
    dz = {rel: (tree, [c for c in cs if c.model_type in only]) for rel, (tree, cs) in dz_all.items()}
    return [c for c in all_cands if c.model_type in only], {rel: v for rel, v in dz.items() if v[1]}


@dataclass
class Sweep:
    """What every section of one sweep shares."""

    out: Path
    registry: dict
    cache: Cache
    fingerprint: str
    tiny_rules: dict
    previous: dict[str, dict]  # verify key -> settled verdict of the previous COVERAGE.json
    jobs: int
    log: Log

    @property
    def installed(self) -> str:
        """The release of the main sweep (the installed transformers)."""
        return dist_version("transformers")

    def section(self, kept: list[Candidate], tf_root: Path, release: str | None, label: str
                ) -> tuple[list[dict], dict]:
        """Convert KEPT and make its rows: (rows, conversion timings)."""
        results, fresh, convert_s = self.convert_all(kept, tf_root, release, label)
        rows = self.make_rows(kept, results, release)
        return rows, {"convert_s": convert_s, "jobs": self.jobs, "converted_fresh": fresh,
                      "converted_cached": len(kept) - fresh}

    def convert_all(self, kept: list[Candidate], tf_root: Path, release: str | None, label: str
                    ) -> tuple[dict[str, dict], int, float]:
        """Convert KEPT (parallel, cached): model type -> record; also how many ran now, and seconds."""
        t_conv = time.time()
        results: dict[str, dict] = {}
        todo = []
        for c in kept:
            key = convert_key(c, tf_root, self.fingerprint, release)
            hit = self.cache.get("convert", key)
            if hit is not None:
                if hit.get("status") == "blocked" and "message" in hit:
                    text = (tf_root / c.source).read_text(encoding="utf-8")
                    hit.update(complete(hit, c.hf_class, c.source, text))
                results[c.model_type] = {**hit, "cached": True}
            else:
                todo.append((c, key))
        self.log(f"{label}: {len(kept)} text decoder causal LMs; "
                 f"{len(kept) - len(todo)} cached, converting {len(todo)} with {self.jobs} job(s)")

        def args(c: Candidate) -> tuple:
            return (c.model_type, c.hf_class, c.source, str(tf_root), release, c.config_only)

        with progress(len(todo), label) as step:
            if self.jobs > 1 and len(todo) > 1:
                ctx = multiprocessing.get_context("spawn")
                with cf.ProcessPoolExecutor(max_workers=self.jobs, mp_context=ctx) as pool:
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
                            self.cache.put("convert", key, rec)
                        results[c.model_type] = {**rec, "cached": False}
                        step(c.model_type)
            else:
                for c, key in todo:
                    rec = convert_task(*args(c))
                    self.cache.put("convert", key, rec)
                    results[c.model_type] = {**rec, "cached": False}
                    step(c.model_type)
        return results, len(todo), round(time.time() - t_conv, 1)


    def make_rows(self, kept: list[Candidate], results: dict[str, dict], release: str | None) -> list[dict]:
        """One row per kept model type: its conversion, committed port and carried-over verification."""
        tiny_models = self.tiny_rules.get("models", {}) or {}
        rows = []
        for c in kept:
            r = results[c.model_type]
            port_name = r.get("port_name") or (
                c.model_type if c.config_only else Path(c.source).stem.removeprefix("modeling_"))
            committed = _committed(self.out, port_name, c.source)
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
                "vllm_native": self.registry.get(c.hf_class, {"kind": "none", "detail": "not in vLLM's registry"}),
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
                vkey = verify_key(digest, entry, self.tiny_rules) if digest else None
                row["_vkey"] = vkey
                got = self.cache.get("verify", vkey) if vkey else None
                if got is not None and not settled(got):
                    got = None
                if committed and not release and committed["transformers_version"] != self.installed:
                    # regenerated from a newer release (the weekly workflow's tree): the row's
                    # verification is that committed port's own verdict, when it holds
                    got = from_verdict(self.out / committed["path"], vkey)
                    if got is not None:
                        got["port"] = f"committed (transformers {committed['transformers_version']})"
                if got is None and vkey in self.previous:
                    got = dict(self.previous[vkey])
                    if not (committed and committed.get("matches_conversion")):
                        got.pop("verdict", None)  # a verdict of another port than this conversion
                if got is None and committed and committed.get("matches_conversion"):
                    got = from_verdict(self.out / committed["path"], vkey)
                if got is not None:
                    row["verify"] = {**got, "carried_over": True}
            rows.append(row)
        return rows


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
        "vllm_digest": files_digest(info.files),
        "same_source": info.source == source,
    }
