"""Verifying the sweep's converted rows in the engine (TP=1 and TP=2, one port at a time), and
which verdicts are kept: a settled one (a pass, or a numerical mismatch) is cached and carried
over while the port and its tiny config are unchanged."""

from __future__ import annotations

import json
import time
from pathlib import Path

from porter.coverage.cache import Cache, files_digest, verify_key
from porter.coverage.common import CACHE_DIR, TPS, Log, package_dir, progress


def verify_rows(rows: list[dict], out: Path, cache: Cache, cache_dir: Path | None, log: Log) -> float:
    """Verify each converted row without a carried-over verdict (sequential: the engine uses both
    cores); a row's ``verify`` is set in place. Returns the seconds taken."""
    t_ver = time.time()
    targets = [r for r in rows if r["status"] == "converted"]
    with progress(len(targets), "verify") as step:
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
            if settled(row["verify"]):
                cache.put("verify", row["_vkey"], row["verify"])
            log(f"verify {row['model_type']}: {row['verify']['status']} "
                f"({row['verify'].get('seconds', 0):.0f} s)")
            step(row["model_type"])
    return round(time.time() - t_ver, 1)


def settled(v: dict) -> bool:
    """A verdict worth keeping: a pass, or a numerical mismatch (exit 1). An engine that did not
    start or timed out (exit 2) is run again next time."""
    return v.get("status") == "passed" or (v.get("status") == "failed" and v.get("exit_code") == 1)


def previous_verifications(path: Path) -> dict[str, dict]:
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
        if v.get("key") and settled(v):
            out[v["key"]] = {k: val for k, val in v.items() if k != "carried_over"}
    return out


def from_verdict(port_dir: Path, key: str | None) -> dict | None:
    """A committed port's row verdict read from the verdict store (generated/verdicts/): the
    engine run the test suite or `porter verify` made of these same port files, sources, tiny
    config and versions; None unless that verdict holds (passed at TP=1 and TP=2)."""
    from porter.verify import verdicts

    generated = port_dir.parent.parent
    if verdicts.status(port_dir, tuple(TPS), generated) != "valid":
        return None
    v = verdicts.load(port_dir, generated)
    runs = [v["tp"][str(tp)] for tp in TPS]
    deltas = [r["max_abs_dlogprob"] for r in runs if isinstance(r.get("max_abs_dlogprob"), (int, float))]
    return {
        "status": "passed", "passed": True, "exit_code": 0, "reason": None, "tps": list(TPS),
        "port": "committed", "max_abs_dlogprob": max(deltas) if deltas else None,
        "seconds": 0, "key": key, "verdict": f"generated/verdicts/{v['port']}.json",
        "date": max(r.get("date") or "" for r in runs),
    }


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
            src = str(package_dir("transformers") / row["source"])
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
    key = verify_key(files_digest(info.files), (rules.get("models") or {}).get(info.model_type), rules)
    res = {
        "status": "passed" if report.passed else "failed", "passed": report.passed,
        "exit_code": report.exit_code, "reason": report.reason, "tps": list(TPS), "port": "committed",
        "max_abs_dlogprob": _max_delta(report), "seconds": report.timings.get("total", 0), "key": key,
    }
    if settled(res):
        Cache(cache_dir).put("verify", key, res)
    return res


def _max_delta(rep) -> float | None:
    vals = [r.port.comparison.max_delta for r in rep.results
            if r.port is not None and r.port.comparison is not None]
    vals = [float(v) for v in vals if isinstance(v, (int, float))]
    return max(vals) if vals else None
