"""Count and time the torch ops of one decode step: port vs vLLM native (torch.profiler).

    .venv/bin/python bench/op_profile.py llama [--paths port,native] [--steps 32] [--phase prefill]

Wall-clock throughput on a shared 2-core VM moves by several percent from one process to the
next; the ops a decode step dispatches do not. For each path, in its own process built exactly
as `porter bench` builds its worker (same checkpoint, same engine settings), this profiles the
bench's decode batch twice, with max_tokens = steps + 1 and with max_tokens = 1, and subtracts:
what is left is `steps` decode steps. It prints, per path, the ops per decode step and their
self CPU time per step, grouped (GEMM, attention, norm, rotary, elementwise, other), and the
ops whose count per step differs between the paths. `--phase prefill` profiles `steps` prefill
batches of the bench (max_tokens=1 on the long prompts) instead, per batch.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

GROUPS = (  # first match wins; names are torch profiler event names
    ("gemm", ("gemm", "addmm", "aten::mm", "matmul", "linear", "onednn", "mkldnn")),
    ("attention", ("attention", "paged", "attn", "sdpa", "reshape_and_cache")),
    ("norm", ("rms_norm", "layer_norm", "norm")),
    ("rotary", ("rotary", "rope")),
    (
        "elementwise",
        (
            "aten::add",
            "aten::mul",
            "aten::sub",
            "aten::div",
            "silu",
            "gelu",
            "act_and_mul",
            "aten::neg",
            "aten::pow",
            "aten::rsqrt",
            "aten::mean",
            "aten::copy_",
            "aten::cat",
        ),
    ),
)


def _group(name: str) -> str:
    low = name.lower()
    for g, keys in GROUPS:
        if any(k in low for k in keys):
            return g
    return "other"


def _child(spec: dict, steps: int, phase: str) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from porter import bench as B

    wl = B.Workload()
    _, _, run_steps = B.vllm_runner(spec)
    short, long = spec["short"], spec["long"]
    run_steps(short, 8)  # warm-up
    run_steps(long, 1)

    def ops(max_tokens: int) -> dict[str, list[float]]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            if phase == "prefill":
                for _ in range(max_tokens - 1):  # ops(steps + 1) - ops(1): `steps` batches
                    run_steps(long, 1)
            else:
                run_steps(short, max_tokens)
        out: dict[str, list[float]] = {}
        for e in prof.key_averages():
            out[e.key] = [e.count, e.self_cpu_time_total]
        return out

    torch.manual_seed(0)
    longer, one = ops(steps + 1), ops(1)
    diff = {
        k: [(v[0] - one.get(k, [0, 0])[0]) / steps, (v[1] - one.get(k, [0, 0])[1]) / steps]
        for k, v in longer.items()
    }
    print(json.dumps({"per_step": diff, "batch": wl.decode_batch}), flush=True)


def profile_path(model: str, path: str, steps: int, phase: str = "decode") -> dict:
    from porter import bench as B

    with tempfile.TemporaryDirectory(prefix="porter-ops-") as tmp:
        tmp = Path(tmp)
        spec, env, _, long, short = B.single_path(model, path, tmp)
        spec.update(short=short, long=long)
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                json.dumps(spec),
                "--steps",
                str(steps),
                "--phase",
                phase,
            ],
            env=env,
            capture_output=True,
            text=True,
            cwd=tmp,
        )
    if out.returncode:
        raise SystemExit(f"{model} {path}: the profile failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _top_level(per_step: dict) -> dict:
    """Ops that are not the profiler's own frames; counts and times per decode step."""
    return {k: v for k, v in per_step.items() if not k.startswith(("ProfilerStep", "[memory]"))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--paths", default="port,native")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--phase", choices=("decode", "prefill"), default="decode")
    ap.add_argument("--child")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.child:
        _child(json.loads(args.child), args.steps, args.phase)
        return
    res = {
        p: _top_level(profile_path(args.model, p, args.steps, args.phase)["per_step"])
        for p in args.paths.split(",")
    }
    if args.json:
        print(json.dumps(res, indent=1))
        return
    unit = "prefill batch" if args.phase == "prefill" else "decode step"
    print(f"{args.model}: per {unit}, {args.steps} of them, self CPU time in ms")
    groups = {p: collections.defaultdict(lambda: [0.0, 0.0]) for p in res}
    for p, ops in res.items():
        for name, (n, t) in ops.items():
            g = groups[p][_group(name)]
            g[0] += n
            g[1] += t / 1000
    names = sorted({g for p in groups for g in groups[p]})
    print(f"{'group':12}" + "".join(f"{p + ' ops':>14}{p + ' ms':>12}" for p in res))
    for g in names + ["total"]:
        row = f"{g:12}"
        for p in res:
            n, t = (
                (sum(v[0] for v in groups[p].values()), sum(v[1] for v in groups[p].values()))
                if g == "total"
                else groups[p][g]
            )
            row += f"{n:14.1f}{t:12.3f}"
        print(row)
    for a, b in zip(list(res), list(res)[1:]):
        print(f"\nops whose count per {unit} differs ({a} - {b}):")
        for name in sorted(set(res[a]) | set(res[b])):
            na, nb = res[a].get(name, [0, 0])[0], res[b].get(name, [0, 0])[0]
            if abs(na - nb) > 0.01:
                ta, tb = res[a].get(name, [0, 0])[1], res[b].get(name, [0, 0])[1]
                print(f"  {name:50} {na:8.1f} {nb:8.1f}   ({ta / 1000:.3f} vs {tb / 1000:.3f} ms)")


if __name__ == "__main__":
    main()
