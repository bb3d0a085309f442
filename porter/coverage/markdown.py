"""COVERAGE.md, rendered from the JSON report: the counts, the blocked rows by rule, every row,
the exclusions, and a section of the same kind for each day-zero release."""

from __future__ import annotations


def _cell(text) -> str:
    return "" if text is None else str(text).replace("|", "\\|").replace("\n", " ")


def _md_blocked(groups: dict[str, list[str]]) -> list[str]:
    L = ["| rule | count | model types |", "|---|---:|---|"]
    for rule, types in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        L.append(f"| {_cell(rule)} | {len(types)} | {', '.join(types)} |")
    return L


def _md_rows(rows: list[dict], version: str, notes: bool = False) -> list[str]:
    """VERSION: the release of the main sweep (a committed port of another one says which)."""
    head = "| model_type | HF class | status | diagnostic | vLLM native | committed port |"
    rule = "|---|---|---|---|---|---|"
    L = [head + (" why a row |" if notes else ""), rule + ("---|" if notes else "")]
    for r in rows:
        v = r.get("verify") or {}
        diag = r["diagnostic"] or ""
        if r["status"] == "verify failed":
            diag = v.get("reason") or "verify failed"
        elif r["status"] == "converted (no tiny config)":
            diag = v.get("reason", "")
        elif r["status"] == "verified" and v.get("max_abs_dlogprob") is not None:
            diag = f"max abs dlogprob {v['max_abs_dlogprob']:.2e}"
        nat = r["vllm_native"]
        native = nat["kind"] + (f" ({nat['detail']})" if nat["kind"] in ("native", "dropped") else "")
        cm = r["committed"]
        if cm:
            port = "yes, verified" if r["status"] == "verified" else "yes, not verified"
            if r.get("release") is None and cm.get("transformers_version") != version:
                port += f" (converted from transformers {cm.get('transformers_version')})"
            elif cm.get("matches_conversion") is False:
                port += " (differs from what porter makes now)"
        else:
            port = "no"
        line = f"| {r['model_type']} | {r['hf_class']} | {r['status']} | {_cell(diag)} | {_cell(native)} | {port} |"
        L.append(line + (f" {_cell(r.get('note') or '')} |" if notes else ""))
    return L


def _md_exclusions(excl: list[dict]) -> list[str]:
    L = ["| model_type | causal-LM class | kind | reason |", "|---|---|---|---|"]
    for e in excl:
        L.append(f"| {e['model_type']} | {e['hf_class']} | {e['kind']} | {_cell(e['reason'])} |")
    return L


def _md_day_zero(sec: dict, rep: dict) -> list[str]:
    c, rel = sec["counts"], sec["release"]
    L = [
        f"## Day zero: transformers {rel}",
        "",
        f"The causal-LM auto-mapping entries of transformers {rel} whose model type the installed "
        f"transformers {sec['installed_transformers']} does not have, read statically from the "
        f"release's wheel ({sec['wheel'] or 'transformers ' + rel}; nothing imported), converted as "
        f"`porter convert MODEL --transformers {rel}` does (the port ships the config class); "
        f"verified at TP={','.join(map(str, rep['tps']))} with the HF side in that release's venv. "
        "Releases are listed in `rules/coverage.yaml` (`day_zero_releases`). The exclusions are the "
        "main sweep's, with one that does not hold for a release newer than the engine's: a "
        "config-only model type (the engine's transformers cannot read its config, so the other "
        "family's port does not serve it). Column \"why a row\" says why such a row, or the "
        "text-only causal LM of a multimodal family (its own class, which builds no tower), is kept.",
        "",
        "| | count |",
        "|---|---:|",
        f"| new causal-LM auto-mapping entries | {c['new_causal_lm_mapping_entries']} |",
        f"| excluded (not a text decoder-only causal LM; see below) | {c['excluded']} |",
        f"| **total day-zero text decoder causal LMs** | **{c['total']}** |",
        f"| of which kept by a day-zero note (config only / text model) | {c['kept_by_day_zero_note']} |",
        f"| converted (both targets) | {c['converted']} |",
        f"| verified at TP=1 and TP=2 | {c['verified']} |",
        f"| verify failed | {c['verify_failed']} |",
        f"| converted, no tiny config (not verified) | {c['converted_no_tiny_config']} |",
        f"| converted, verify not run | {c['converted_not_verified']} |",
        f"| blocked (one-line diagnostic) | {c['blocked']} |",
        f"| porter crashed | {c['crashed']} |",
        f"| committed ports (generated/vllm) / verified | {c['committed_ports']} / {c['committed_ports_verified']} |",
        "",
        f"### Blocked, by rule ({rel})",
        "",
        *_md_blocked(sec["blocked_groups"]),
        "",
        f"### Architectures ({rel})",
        "",
        *_md_rows(sec["rows"], rep["transformers_version"], notes=True),
        "",
        f"### Excluded ({rel})",
        "",
        *_md_exclusions(sec["exclusions"]),
    ]
    t = sec["timings"]
    L += ["", f"Sweep: {t['converted_fresh']} converted now, {t['converted_cached']} from the cache, "
              f"{t['jobs']} job(s); convert {t['convert_s']} s.", ""]
    return L


def render_md(rep: dict) -> str:
    c = rep["counts"]
    L = [
        "# Coverage",
        "",
        f"Every text decoder-only causal LM of transformers {rep['transformers_version']} "
        f"(model types with a causal-LM class in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, read statically), "
        f"converted by porter {rep['porter_version']} for {' and '.join(rep['targets'])}; "
        f"verified in vLLM {rep['vllm_version']} at TP={','.join(map(str, rep['tps']))}. "
        "Regenerate with `porter coverage --verify` (`porter coverage` alone converts and keeps "
        "the verify results of unchanged ports).",
        "",
    ]
    if rep.get("day_zero"):
        L += ["Day zero (model types only a newer transformers release has): "
              + ", ".join(f"[transformers {s['release']}](#day-zero-transformers-{s['release'].replace('.', '')})"
                          f" ({s['counts']['total']} rows, {s['counts']['verified']} verified)"
                          for s in rep["day_zero"]) + ", below.", ""]
    if rep.get("partial"):
        L += ["**Partial sweep** (`--only`): the counts cover the listed model types only.", ""]
    L += [
        "| | count |",
        "|---|---:|",
        f"| causal-LM auto-mapping entries | {c['causal_lm_mapping_entries']} |",
        f"| excluded (not a text decoder-only causal LM; see below) | {c['excluded']} |",
        f"| **total text decoder causal LMs** | **{c['total']}** |",
        f"| of which the text model of a multimodal family (column \"why a row\") | "
        f"{sum(bool(r.get('note')) for r in rep['rows'])} |",
        f"| converted (both targets) | {c['converted']} |",
        f"| verified at TP=1 and TP=2 | {c['verified']} |",
        f"| verify failed | {c['verify_failed']} |",
        f"| converted, no tiny config (not verified) | {c['converted_no_tiny_config']} |",
        f"| converted, verify not run | {c['converted_not_verified']} |",
        f"| blocked (one-line diagnostic) | {c['blocked']} |",
        f"| porter crashed | {c['crashed']} |",
        f"| committed ports (generated/vllm) / verified | {c['committed_ports']} / {c['committed_ports_verified']} |",
        "",
        "## Blocked, by rule",
        "",
        *_md_blocked(rep["blocked_groups"]),
        "",
        "## Architectures",
        "",
        "vLLM native: `native` = vLLM 0.32 has its own model file; `transformers-backend` = served "
        "through vLLM's Transformers backend (no model file of its own); `dropped` = removed from vLLM; "
        "`none` = not in vLLM's registry.",
        "",
        *_md_rows(rep["rows"], rep["transformers_version"], notes=any(r.get("note") for r in rep["rows"])),
        "",
        "## Excluded",
        "",
        *_md_exclusions(rep["exclusions"]),
    ]
    t = rep["timings"]
    L += [
        "",
        f"Sweep: {t['converted_fresh']} converted now, {t['converted_cached']} from the cache, "
        f"{t['jobs']} job(s); convert {t['convert_s']} s, verify {t['verify_s']} s, total {t['total_s']} s.",
        "",
    ]
    for sec in rep.get("day_zero") or []:
        L += _md_day_zero(sec, rep)
    return "\n".join(L)
