"""The bench's statistics: per-path medians, and the port's paired per-repeat ratios to each
other path with their spread and a bootstrap interval of the median."""

from __future__ import annotations

import random
import statistics


def bootstrap_median_ci(xs: list[float], n: int = 4000, seed: int = 0) -> list[float] | None:
    """95 % percentile-bootstrap interval of the median of ``xs`` (None below 5 values)."""
    if len(xs) < 5:
        return None
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n))
    return [meds[int(0.025 * n)], meds[int(0.975 * n) - 1]]


def summarize(runs: list[dict], live: list[str]) -> dict:
    out: dict = {"median": {}, "ratios": {}}
    metrics = ("prefill_tok_s", "decode_tok_s")
    for name in live:
        rs = [r for r in runs if r["path"] == name]
        if not rs:
            continue
        out["median"][name] = {
            m: statistics.median(vals) for m in metrics if (vals := [r[m] for r in rs if m in r])
        }
        out["median"][name]["n"] = len(rs)
    by_rep: dict[int, dict] = {}
    for r in runs:
        by_rep.setdefault(r["repeat"], {})[r["path"]] = r
    for other in ("native", "transformers", "hf"):
        if "port" not in out["median"] or other not in out["median"]:
            continue
        ratios = {}
        for m in metrics:
            paired = [
                rep["port"][m] / rep[other][m]
                for rep in by_rep.values()
                if m in rep.get("port", {}) and m in rep.get(other, {})
            ]
            if not paired:
                continue
            ratios[m] = {
                "median_paired": statistics.median(paired),
                "ci95": bootstrap_median_ci(paired),
                "min_paired": min(paired),
                "max_paired": max(paired),
                "n_paired": len(paired),
                "of_medians": out["median"]["port"][m] / out["median"][other][m],
            }
        out["ratios"][f"port/{other}"] = ratios
    return out
