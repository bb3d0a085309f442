"""Converter speed: median seconds to convert one modeling file (in one process, after imports).

    .venv/bin/python bench/convert_speed.py [--repeats 7] [--json] [model_type ...]

Prints per model the median of N conversions for both targets, as `porter convert` does them
(index + plan once, the rewrite rules every target shares once, then each target's own rules,
templates and formatting; nothing written), and the whole set's total. Not a test: a measurement.
"""

from __future__ import annotations

import argparse
import os
import json
import statistics
import time
from importlib.metadata import version as _tf_version
from pathlib import Path

from porter.convert import analyse, convert_targets
from porter.rules_data import get_target
from porter.source import resolve

# every committed port of the installed transformers (day-zero ports need their release's wheel)
DEFAULT = sorted(
    p.name for p in (Path(__file__).resolve().parent.parent / "generated" / "vllm").iterdir()
    if (p / "PORT.json").exists()
    and json.loads((p / "PORT.json").read_text())["transformers_version"] == _tf_version("transformers")
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=DEFAULT)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", action="store_true", help="machine-readable rows and totals")
    args = ap.parse_args()
    targets = [get_target("vllm"), get_target("aphrodite")]
    t_warm = time.perf_counter()
    source, idx, plan = _prep("llama")
    convert_targets(source, idx, plan, targets)  # warm imports and caches
    warm_s = time.perf_counter() - t_warm
    total = 0.0
    rows = []
    say = (lambda *a: None) if args.json else print
    say(f"{'model':18} {'median s':>9} {'min s':>7} {'cpu s':>7}  (both targets)")
    for model in args.models:
        times, cpu = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            source, idx, plan = _prep(model)
            convert_targets(source, idx, plan, targets)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        med = statistics.median(times)
        total += med
        # cpu: this process's CPU seconds (the ruff formatter subprocess, ~0.03 s, is not in it);
        # less sensitive than wall time to other work on a shared machine
        cpu_med = statistics.median(cpu)
        rows.append({"model": model, "targets": [t.name for t in targets], "median_s": med,
                     "min_s": min(times), "cpu_median_s": cpu_med, "source": str(_prep_source(model))})
        say(f"{model:18} {med:9.3f} {min(times):7.3f} {cpu_med:7.3f}")
    say(f"all {len(args.models)} models x 2 targets: {total:.2f} s (sum of medians)")
    say(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    if args.json:
        print(json.dumps({"rows": rows, "total_s": total, "models": len(args.models),
                          "repeats": args.repeats, "first_call_s": warm_s}, indent=2))


def _prep_source(model: str):
    src = resolve(model)
    return src.rel_path


def _prep(model: str):
    source = resolve(model)
    idx, plan = analyse(source)
    return source, idx, plan


if __name__ == "__main__":
    main()
