"""A bench result as a text table (tok/s per path, the port's ratios) or as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict

from porter.bench.workload import PATHS, BenchResult


def render(res: BenchResult) -> str:
    lines = [
        f"{res.model_type} ({res.architecture}, {res.params / 1e6:.0f}M params, fp32, "
        f"enforce_eager={res.enforce_eager}), {res.repeats} alternating repeats in "
        f"{res.sessions} session(s) of fresh workers",
        f"prefill: {res.workload['prefill_batch']} x {res.workload['prefill_len']} tokens, "
        f"max_tokens=1; decode: {res.workload['decode_batch']} x "
        f"{res.workload['decode_len']}-token prompts, {res.workload['decode_tokens']} tokens, greedy",
        f"machine: {res.machine.get('Model name', '?')}, {res.machine.get('cpus')} CPUs, "
        f"{_cpu_text(res.machine)}; "
        f"load average (1 min) min/median/max "
        f"{res.load.get('min', 0):.2f}/{res.load.get('median', 0):.2f}/{res.load.get('max', 0):.2f}",
        "",
        f"{'path':13} {'prefill tok/s':>14} {'decode tok/s':>13}  class",
    ]
    for name in PATHS:
        p = res.paths.get(name)
        if p is None:
            continue
        m = res.summary.get("median", {}).get(name)
        if m:
            lines.append(
                f"{name:13} {m['prefill_tok_s']:14.1f} {m['decode_tok_s']:13.1f}  {p.get('class')}"
            )
        else:
            lines.append(f"{name:13} {'-':>14} {'-':>13}  not run: {p.get('error')}")
    lines.append("")
    for key, r in res.summary.get("ratios", {}).items():
        lines.append(
            f"{key:20} prefill {_ratio_text(r['prefill_tok_s'])}  "
            f"decode {_ratio_text(r['decode_tok_s'])}"
        )
    if res.summary.get("ratios"):
        lines.append("(median of paired per-repeat ratios [min..max], bootstrap 95 % interval)")
    return "\n".join(lines)


def _cpu_text(machine: dict) -> str:
    from porter.verify.cpu import describe

    feats = machine.get("cpu_features")
    return describe(feats) if feats else f"AVX-512: {machine.get('avx512', '?')}"


def _ratio_text(r: dict) -> str:
    ci = r.get("ci95")
    ci_text = f" ci95 {ci[0]:.3f}..{ci[1]:.3f}" if ci else ""
    return f"{r['median_paired']:.3f} [{r['min_paired']:.3f}..{r['max_paired']:.3f}]{ci_text}"


def to_json(res: BenchResult) -> str:
    return json.dumps(asdict(res), indent=2)
