"""Regenerate bench/RESULTS.md, bench/results.json and bench/throughput.png in one command.

    .venv/bin/python bench/run_all.py                # everything (also: make bench)
    .venv/bin/python bench/run_all.py --only render  # re-render from bench/results.json

Sections: throughput (porter bench per model, all models in this one run), paired (port and
native in one engine, timed forward by forward: porter/benchpair.py), convert (every
port in generated/vllm, both targets, per file: bench/convert_speed.py), verify (one
`porter verify --tp 1,2` per listed model, wall time). A section that is not run keeps its
previous numbers in results.json. Not a test: a measurement on a possibly shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

RESULTS_JSON = HERE / "results.json"
RESULTS_MD = HERE / "RESULTS.md"
PLOT = HERE / "throughput.png"
BENCH_MODELS = ["llama", "qwen2", "opt", "phi", "gpt_neox"]
VERIFY_MODELS = ["llama", "qwen2", "opt"]
PAIRED_MODELS = ["llama", "qwen2", "opt"]  # the bench models vLLM has a native class for


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def throughput(models: list[str], repeats: int, sessions: int, enforce_eager: bool) -> dict:
    from porter.bench import render, run_bench

    out = {}
    for m in models:
        res = run_bench(m, repeats=repeats, sessions=sessions or None,
                        enforce_eager=enforce_eager, log=log)
        print(render(res), flush=True)
        out[m] = asdict(res)
        _save_partial("throughput", out)
    return out


def paired(models: list[str], repeats: int) -> dict:
    from porter.benchpair import render, run

    out = {}
    for m in models:
        log(f"paired forward timing: {m} ({repeats} repeats)")
        out[m] = run(m, repeats)
        print(render(m, out[m]), flush=True)
    # the instrument's own floor: the same native class in both slots
    aa = f"A/A control ({models[0]}: native in both slots)"
    log(f"paired forward timing: {aa}")
    out[aa] = run(models[0], repeats, aa=True)
    print(render(aa, out[aa]), flush=True)
    return out


# a fresh process converting the models it is given, both targets (imports included)
_CONVERT_ZOO = [sys.executable, "-c",
                "import sys; from pathlib import Path; from porter.convert import convert;"
                "[convert(m, ['vllm', 'aphrodite'], Path(sys.argv[1]), force=True) for m in sys.argv[2:]]"]


def convert(repeats: int) -> dict:
    from bench.convert_speed import DEFAULT as models  # the committed ports of the installed release
    t0 = time.perf_counter()
    load_before = round(os.getloadavg()[0], 2)
    proc = subprocess.run(
        [sys.executable, str(HERE / "convert_speed.py"), "--repeats", str(repeats), "--json",
         *models], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"convert_speed.py failed:\n{proc.stderr[-3000:]}")
    data = json.loads(proc.stdout)
    data["load1_before"], data["load1_after"] = load_before, round(os.getloadavg()[0], 2)
    # cold: the whole zoo, both targets, in a fresh process (imports included), as a user runs it
    cold_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "porter-bench-convert"
    t1 = time.perf_counter()
    cold = subprocess.run(
        [*_CONVERT_ZOO,
         str(cold_dir), *models], capture_output=True, text=True, cwd=ROOT)
    data["cold_process_s"] = round(time.perf_counter() - t1, 2)
    data["cold_ok"] = cold.returncode == 0
    if cold.returncode != 0:
        data["cold_error"] = cold.stderr[-1000:]
    # the same on both cores: two fresh processes, each converting every other model
    t2 = time.perf_counter()
    halves = [subprocess.Popen(
        [*_CONVERT_ZOO,
         str(cold_dir), *models[i::2]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
        for i in range(2)]
    codes = [h.wait() for h in halves]
    data["cold_2proc_s"] = round(time.perf_counter() - t2, 2)
    data["cold_2proc_ok"] = all(c == 0 for c in codes)
    data["measure_s"] = round(time.perf_counter() - t0, 1)
    return data


def verify(models: list[str]) -> dict:
    out = {}
    for m in models:
        log(f"porter verify {m} --tp 1,2")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "porter", "verify", m, "--tp", "1,2",
                               "--json"], capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        rec = {"wall_s": round(wall, 1), "exit": proc.returncode,
               "load1_after": round(os.getloadavg()[0], 2)}
        try:
            rep = json.loads(proc.stdout)
            rec["timings"] = rep.get("timings_s") or rep.get("timings")
        except ValueError:
            rec["stderr"] = proc.stderr[-500:]
        out[m] = rec
    return out


def _load() -> dict:
    return json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}


def _save_partial(section: str, value) -> None:
    data = _load()
    data[section] = value
    RESULTS_JSON.write_text(json.dumps(data, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="throughput,paired,convert,verify,render",
                    help="comma-separated sections: throughput, paired, convert, verify, render")
    ap.add_argument("--models", default=",".join(BENCH_MODELS))
    ap.add_argument("--verify-models", default=",".join(VERIFY_MODELS))
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--sessions", type=int, default=5, help="fresh-worker sessions (0: one per repeat)")
    ap.add_argument("--convert-repeats", type=int, default=3)
    ap.add_argument("--paired-repeats", type=int, default=20)
    ap.add_argument("--compile", action="store_true",
                    help="vLLM paths with enforce_eager=False (inductor on CPU; slow to start)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    from porter.bench import machine

    if "throughput" in only:
        _save_partial("throughput", throughput(args.models.split(","), args.repeats,
                                               args.sessions, not args.compile))
    if "paired" in only:
        _save_partial("paired", paired(PAIRED_MODELS, args.paired_repeats))
    if "convert" in only:
        log("convert speed")
        _save_partial("convert", convert(args.convert_repeats))
    if "verify" in only:
        _save_partial("verify", verify(args.verify_models.split(",")))
    if "render" in only:
        data = _load()
        data["machine"] = data.get("machine") or machine()
        from bench.render import render_md, render_plot

        render_plot(data, PLOT)
        RESULTS_MD.write_text(render_md(data, PLOT.name))
        log(f"wrote {RESULTS_MD.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
