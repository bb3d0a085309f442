"""Profile one bench path's model forward with py-spy (the engine core process of a worker).

    .venv/bin/python bench/profile_paths.py llama --paths port,native [--phase decode] [--seconds 20]

Starts the path's worker exactly as `porter bench` does, keeps it busy with the bench's decode
(or prefill) batch while `py-spy record --format raw` samples the process that runs the model,
then prints, per path: the share of samples under the model's forward, and the model-code
frames (port module / vLLM model file) with the most inclusive samples. Writes the collapsed
stacks to bench/profiles/<model>-<path>-<phase>.txt (not committed).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    kids = [int(x) for x in out.stdout.split()]
    return kids + [g for k in kids for g in _children(k)]


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def profile(model: str, path: str, phase: str, seconds: float, out_dir: Path) -> Path:
    from porter import bench as B

    with tempfile.TemporaryDirectory(prefix="porter-profile-") as tmp:
        tmp = Path(tmp)
        spec, env, wl, long, short = B.single_path(model, path, tmp)
        w = B.Worker(path, spec, env, tmp / "worker.log")
        try:
            ready = w.wait_ready()
            if not ready.get("ready"):
                raise SystemExit(f"{path}: {ready}")
            # the process that runs the model: the engine core child (V1), else the worker
            # (vLLM CPU, TP=1: worker -> VLLM::EngineCore -> VLLM::Worker, which runs it)
            kids = _children(w.proc.pid)
            target = next((p for p in kids if "VLLM::Worker" in _cmd(p)),
                          next((p for p in kids if "EngineCore" in _cmd(p)), w.proc.pid))
            out = out_dir / f"{model}-{path}-{phase}.txt"
            prompts, n = (short, wl.decode_tokens) if phase == "decode" else (long, 1)
            w.call(prompts, n)  # warm
            stop = threading.Event()

            def load():
                while not stop.is_set():
                    w.call(prompts, n)

            t = threading.Thread(target=load, daemon=True)
            t.start()
            subprocess.run(["py-spy", "record", "--pid", str(target), "--duration",
                            str(int(seconds)), "--rate", "200", "--format", "raw", "--output",
                            str(out), "--nonblocking"], capture_output=True, check=False,
                           executable=str(Path(sys.executable).parent / "py-spy"))
            stop.set()
            t.join(timeout=120)
        finally:
            w.close()
    return out


def summarize(raw: Path, top: int = 25) -> dict:
    total = 0
    fwd = 0
    incl: collections.Counter = collections.Counter()
    leaf: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        n = int(n)
        total += n
        frames = stack.split(";")
        if any("forward" in f and ("porter_vllm_" in f or "model_executor/models/" in f)
               for f in frames):
            fwd += n
        seen = set()
        for f in frames:
            if ("porter_vllm_" in f or "model_executor/" in f) and f not in seen:
                seen.add(f)
                incl[f] += n
        leaf[frames[-1]] += n
    return {"samples": total, "under_model_forward": fwd,
            "top_inclusive": incl.most_common(top), "top_leaf": leaf.most_common(12)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--paths", default="port,native")
    ap.add_argument("--phase", default="decode", choices=("decode", "prefill"))
    ap.add_argument("--seconds", type=float, default=20)
    args = ap.parse_args()
    out_dir = HERE / "profiles"
    out_dir.mkdir(exist_ok=True)
    for path in args.paths.split(","):
        raw = profile(args.model, path, args.phase, args.seconds, out_dir)
        s = summarize(raw)
        print(f"== {args.model} {path} {args.phase}: {s['samples']} samples, "
              f"{s['under_model_forward']} under the model forward")
        for f, n in s["top_inclusive"]:
            print(f"  {n:6d} {100 * n / max(s['samples'], 1):5.1f}%  {f}")
        print("  leaf frames:")
        for f, n in s["top_leaf"]:
            print(f"  {n:6d} {100 * n / max(s['samples'], 1):5.1f}%  {f}")
        print(json.dumps({"raw": str(raw)}))


if __name__ == "__main__":
    main()
