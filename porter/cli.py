"""porter's command line: convert, plan, verify, serve, rules, diff, regen, coverage."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from porter.errors import PorterError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
err = Console(stderr=True)

TARGETS_ALL = ("vllm", "aphrodite")


def _fail(exc: PorterError) -> None:
    # plain write: one line, never wrapped to the terminal width
    sys.stderr.write(f"porter: error: {exc.one_line()}\n")
    raise typer.Exit(exc.exit_code)


def _parse_tp(tp: str) -> list[int]:
    """--tp "1,2" -> [1, 2]; anything else is a one-line error."""
    try:
        tps = sorted({int(x) for x in tp.split(",") if x.strip()})
        if not tps or any(t not in (1, 2) for t in tps):
            raise ValueError
    except ValueError:
        _fail(PorterError(f"bad --tp {tp!r}: give sizes from 1,2 (this machine has 2 cores)", construct="--tp"))
    return tps


def _targets(target: str) -> list[str]:
    if target == "all":
        return list(TARGETS_ALL)
    from porter.rules_data import get_target

    return [get_target(target).name]


@app.command()
def convert(
    src: str = typer.Argument(..., help="A modeling_*.py path, a remote-code repository folder (modeling_*.py, configuration_*.py, config.json), or a model_type (e.g. opt, llama)."),
    target: str = typer.Option("all", help="vllm | aphrodite | all"),
    out: Path = typer.Option(Path("generated"), help="Root directory; ports land in OUT/<target>/<model_type>/."),
    config: str | None = typer.Option(None, help="configuration_*.py to read statically."),
    force: bool = typer.Option(False, help="Overwrite a port even if it was edited by hand."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable summary."),
    transformers: str | None = typer.Option(
        None, "--transformers",
        help="Read SRC from this transformers release (its wheel, fetched with pip and read statically); "
             "a config class the engine's transformers lacks ships with the port."),
) -> None:
    """Convert an HF modeling file into engine ports (static: SRC is never imported)."""
    from porter.convert import convert as do_convert

    try:
        results = do_convert(src, _targets(target), out, config=config, force=force,
                             transformers=transformers)
    except PorterError as exc:
        _fail(exc)
    summary = [
        {"target": r.target, "model_type": r.info.model_type, "architecture": r.info.architecture,
         "path": str(out / r.target / r.info.model_type), "rules": r.rules_applied}
        for r in results
    ]
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        for s in summary:
            print(f"{s['path']}: {s['architecture']} ({len(s['rules'])} rules)")


@app.command()
def plan(
    src: str = typer.Argument(...),
    config: str | None = typer.Option(None),
) -> None:
    """Print the port plan (roles, fusions, TP layout) for SRC."""
    from porter.convert import plan_json

    try:
        print(plan_json(src, config=config))
    except PorterError as exc:
        _fail(exc)


def _reference_env(tiny: list[str], reference_transformers: str | None) -> None:
    """`--tiny` and `--reference-transformers`, handed to the HF side (and the verdict store,
    which records no verdict of a run with tiny overrides) as the environment it reads."""
    import os

    if tiny:
        from porter.verify.remote_side import parse_tiny

        try:
            os.environ["PORTER_TINY_OVERRIDES"] = json.dumps(parse_tiny(tiny))
        except ValueError as exc:
            _fail(PorterError(str(exc), construct="--tiny"))
    if reference_transformers:
        os.environ["PORTER_REFERENCE_TRANSFORMERS"] = reference_transformers


@app.command()
def verify(
    port: str = typer.Argument(..., help="A port directory, or a model_type with a port in generated/<target>/."),
    target: str = typer.Option("vllm", help="vllm (engine run) | aphrodite (structural, no forward)"),
    tp: str = typer.Option("1,2", help="Tensor-parallel sizes, comma-separated."),
    against_native: bool = typer.Option(False, help="Also run the engine's native port on the same checkpoint."),
    compiled: bool = typer.Option(False, "--compile", help="Run the engine without enforce_eager: vLLM compiles the port's base model."),
    as_json: bool = typer.Option(False, "--json"),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="A real HF checkpoint folder (config.json, safetensors, tokenizer): "
        "the engine builds the port from it; prompts are real text; TPs the heads do not allow are skipped."),
    prompts: Path | None = typer.Option(
        None, "--prompts", help="With --checkpoint: your prompts, one a line (or a JSON list of strings)."),
    tiny: list[str] = typer.Option(
        [], "--tiny", help="key=value: override a field of the tiny config (repeatable; the run records no verdict)."),
    reference_transformers: str | None = typer.Option(
        None, "--reference-transformers", help="A port of remote code: run its HF reference under this "
        "transformers release's venv (code written for an older release)."),
    pp: int | None = typer.Option(
        None, "--pp", help="With --target aphrodite: also build the port's pipeline stages, one process each "
        "(structural, against the native class's stages)."),
) -> None:
    """Run the port in the real engine and compare with Hugging Face (exit 0 pass, 1 mismatch, 2 error)."""
    tps = _parse_tp(tp)
    _reference_env(tiny, reference_transformers)
    if target not in TARGETS_ALL:
        _fail(PorterError(f"unknown target {target!r}", construct="--target"))
    from porter.layout import PortInfo
    from porter.verify import render_report, resolve_port, run_verify

    port_dir = resolve_port(port, target=target)
    if not (port_dir / "PORT.json").is_file():
        _fail(PorterError("not a port directory (no PORT.json) and no committed port of that "
                          "model type", file=str(port_dir), construct="PORT"))
    try:
        PortInfo.load(port_dir)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        _fail(PorterError(f"PORT.json is unreadable: {type(exc).__name__}",
                          file=str(port_dir / "PORT.json"), construct="PORT"))
    if pp is not None and pp < 2:
        _fail(PorterError(f"bad --pp {pp}: a pipeline of 2 or more stages", construct="--pp"))
    if pp is not None and as_json:
        _fail(PorterError("--pp prints its own report: run it without --json", construct="--pp"))
    if target == "aphrodite":
        from porter.verify import structure

        code = structure.main([str(port_dir)] + (["--json"] if as_json else []))
        if pp is not None and code == 0:
            from porter.verify import stages

            code = stages.main([str(port_dir), "--pp", str(pp)] + (["--json"] if as_json else []))
        raise typer.Exit(code)
    if pp is not None:
        _fail(PorterError("--pp checks Aphrodite's pipeline stages (--target aphrodite); vLLM's run in "
                          "the engine in tests/test_pipeline_parallel.py", construct="--pp"))
    if prompts is not None and checkpoint is None:
        _fail(PorterError("--prompts goes with --checkpoint (the tiny checkpoint has no tokenizer)",
                          construct="--prompts"))
    if checkpoint is not None and target != "vllm":
        _fail(PorterError("--checkpoint runs the port in vLLM; Aphrodite's engine cannot run on this CPU",
                          construct="--checkpoint"))
    report = run_verify(port_dir, tps, against_native=against_native, compiled=compiled,
                        checkpoint=checkpoint, prompts_file=prompts)
    if checkpoint is not None and not report.results and report.exit_code == 2 and not as_json:
        _fail(PorterError(report.reason))  # a bad checkpoint or prompts file: one line, exit 2
    print(render_report(report, json=as_json))
    raise typer.Exit(report.exit_code)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    port: str = typer.Argument(..., help="A port directory, or a model_type with a port in generated/<target>/."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="The HF checkpoint folder to serve (config.json, safetensors, tokenizer)."),
    target: str = typer.Option("vllm", help="vllm | aphrodite (needs a GPU: refused on this CPU)"),
    host: str = typer.Option("127.0.0.1", "--host"),
    http_port: int = typer.Option(8000, "--port", help="The server's HTTP port."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel size."),
) -> None:
    """Start the engine's OpenAI-compatible server with the port on CHECKPOINT's weights
    (`porter serve llama --checkpoint DIR -- --max-model-len 2048`: after `--`, the server's own args)."""
    from porter.layout import PortInfo
    from porter.serve import ServeSpec, serve as run_server
    from porter.verify import resolve_port

    if target not in TARGETS_ALL:
        _fail(PorterError(f"unknown target {target!r}", construct="--target"))
    port_dir = resolve_port(port, target=target)
    try:
        info = PortInfo.load(port_dir)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        _fail(PorterError("not a port directory (no readable PORT.json) and no committed port of "
                          "that model type", file=str(port_dir), construct="PORT"))
    info.path = port_dir.resolve()
    spec = ServeSpec(port_dir, info, checkpoint, host=host, port=http_port, tp=tp,
                     extra=list(ctx.args))
    try:
        code = run_server(spec)
    except PorterError as exc:
        _fail(exc)
    raise typer.Exit(code)


@app.command()
def rules(
    code: str | None = typer.Argument(None, help="Show one rule (code or name) with its examples."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The rule catalogue, built from the rule classes themselves (code, name, why, examples)."""
    import textwrap

    from porter.passes import REGISTRY
    from porter.passes.pipeline import catalogue as rule_catalogue, stage_of

    # the pipeline in run order (before indexing, model, config module), then any rule registered
    # elsewhere (a plugin's)
    catalogue = rule_catalogue()
    if code:
        rule = REGISTRY.get(code) or next((r for r in REGISTRY.values() if r.name == code), None)
        if rule is None:
            _fail(PorterError(f"unknown rule {code!r}", construct="porter rules"))
        if as_json:
            print(json.dumps({"code": rule.code, "name": rule.name, "why": rule.why, "examples": [
                {"before": ex.before, "after": ex.after} for ex in rule.examples]}, indent=2))
            return
        print(f"{rule.code} {rule.name}\n\n{textwrap.fill(rule.why, 100)}\n")
        for i, ex in enumerate(rule.examples, 1):
            print(f"--- example {i}: before\n{ex.before}--- after\n{ex.after}")
        return
    if as_json:
        print(json.dumps([{"code": r.code, "name": r.name, "why": r.why, "examples": len(r.examples),
                           "runs": stage_of(r)} for r in catalogue], indent=2))
        return
    for r in catalogue:
        stage = stage_of(r)
        note = f"  runs: {stage}" if stage else "  (registered, runs in no stage of the pipeline)"
        print(f"{r.code}  {r.name:24} {len(r.examples)} example(s){note}")
        print(textwrap.fill(r.why, 100, initial_indent="    ", subsequent_indent="    "))


@app.command()
def diff(
    src: str = typer.Argument(..., help="A modeling_*.py path, a model_type, or a committed port directory."),
    target: str = typer.Option("vllm", help="vllm | aphrodite (a port directory brings its own)"),
    config: str | None = typer.Option(None, help="configuration_*.py to read statically."),
    as_json: bool = typer.Option(False, "--json", help="The hunks as JSON: scope, rules, lines."),
    html_out: Path | None = typer.Option(None, "--html", help="Also write a self-contained side-by-side page."),
) -> None:
    """The HF source against the port, class by class, each hunk labelled with the rules that made it."""
    from porter.diff import diff_port, print_rich, render_html, render_json, render_text

    if target not in TARGETS_ALL:
        _fail(PorterError(f"unknown target {target!r}", construct="--target"))
    try:
        d = diff_port(src, target, config=config)
    except PorterError as exc:
        _fail(exc)
    if html_out is not None:
        html_out.write_text(render_html(d))
    if as_json:
        print(render_json(d))
    elif sys.stdout.isatty():
        print_rich(d, Console())
    else:
        sys.stdout.write(render_text(d))


@app.command()
def regen(
    transformers: str | None = typer.Option(None, "--transformers", help="Release to regenerate from (default: the version each PORT.json records)."),
    check: bool = typer.Option(False, "--check", help="Regenerate from the recorded versions and compare with the committed ports byte for byte (exit 1 naming each differing file)."),
    root: Path | None = typer.Option(None, "--root", help="Where the committed ports are (default: generated)."),
    out: Path | None = typer.Option(None, "--out", help="Where to write the ports and DRIFT.md/DRIFT.json (default: the root). With --check and no --root: the ports to check."),
    verify: bool = typer.Option(False, "--verify", help="Also run porter verify on the regenerated vllm ports."),
    tp: str = typer.Option("1,2", help="Tensor-parallel sizes for --verify."),
    force: bool = typer.Option(False, help="Overwrite ports edited by hand."),
) -> None:
    """Regenerate every committed port from a transformers release and write the drift report."""
    from porter import regen as rg

    try:
        if check:
            res = rg.check(root or out or Path("generated"))
            for line in res.errors:
                print(f"error: {line}")
            for path in res.differing:
                print(f"differs: {path}")
            if not res.ok:
                raise typer.Exit(1)
            print(f"{res.checked} port(s) are what porter makes now")
            return
        tps = tuple(_parse_tp(tp))
        drift = rg.regen(transformers, root=root or Path("generated"), out=out, verify=verify,
                         tps=tps, force=force, log=lambda m: sys.stderr.write(f"{m}\n"))
    except PorterError as exc:
        _fail(exc)
    dest = out or root or Path("generated")
    print(f"{dest / rg.DRIFT_MD}: {len(drift['models'])} model(s), failed: {', '.join(drift['failed']) or 'none'}")
    cells = drift.get("matrix", {}).get("failed", [])
    if cells:
        print(f"release matrix: failed: {', '.join(f'{m} from {r}' for m, r in cells)}")
    if drift["failed"]:  # (the matrix's failures are the other releases': reported, not this run's)
        raise typer.Exit(1)


@app.command()
def coverage(
    verify: bool = typer.Option(False, "--verify", help="Also verify (TP=1,2) what converts and has a tiny config."),
    jobs: int = typer.Option(1, "--jobs", min=1, help="Conversions in parallel (processes); verification runs one at a time."),
    out: Path = typer.Option(Path("generated"), "--out", help="Where COVERAGE.md/COVERAGE.json go and the committed ports are."),
    only: str | None = typer.Option(None, "--only", help="Comma-separated model types: sweep just these."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Ignore and do not write .porter-cache/coverage."),
    transformers: list[str] | None = typer.Option(
        None, "--transformers",
        help="Day-zero release(s) to sweep too (repeatable; 'none' for none). Default: "
             "day_zero_releases in rules/coverage.yaml."),
) -> None:
    """Sweep every text decoder-only causal LM of the installed transformers (and the model types
    only a newer release has: day zero): converts, or the one-line diagnostic."""
    from porter import coverage as cov

    day_zero = None
    if transformers:
        day_zero = [] if [t.strip().lower() for t in transformers] == ["none"] else [t.strip() for t in transformers]
    try:
        rep = cov.run_coverage(out, verify=verify, jobs=jobs,
                               only=[m.strip() for m in only.split(",") if m.strip()] if only else None,
                               cache_dir=None if no_cache else cov.CACHE_DIR,
                               log=lambda m: sys.stderr.write(f"{m}\n"), day_zero=day_zero)
    except PorterError as exc:
        _fail(exc)
    c = rep["counts"]
    print(f"{out / cov.COVERAGE_MD}: {c['total']} text decoder causal LMs ({c['excluded']} excluded), "
          f"{c['converted']} converted, {c['verified']} verified, {c['blocked']} blocked, {c['crashed']} crashed")
    for sec in rep.get("day_zero") or []:
        d = sec["counts"]
        print(f"  day zero, transformers {sec['release']}: {d['total']} text decoder causal LMs "
              f"({d['excluded']} excluded), {d['converted']} converted, {d['verified']} verified, "
              f"{d['blocked']} blocked, {d['crashed']} crashed")


@app.command()
def bench(
    model: str = typer.Argument(..., help="A model_type with a port in generated/vllm/ (or a port directory)."),
    repeats: int = typer.Option(40, "--repeats", min=1, help="Alternating timed repeats (after one warm-up round per session)."),
    sessions: int = typer.Option(5, "--sessions", min=0, help="Sessions of fresh workers the repeats are split over (0: one per repeat)."),
    paths: str = typer.Option("port,native,transformers,hf", "--paths", help="Comma-separated paths to run (port, native, transformers, hf)."),
    as_json: bool = typer.Option(False, "--json"),
    compile_: bool = typer.Option(False, "--compile", help="vLLM paths with enforce_eager=False (inductor on CPU)."),
    paired: bool = typer.Option(False, "--paired", help="Instead: port and native in one engine, every forward timed for both (porter/benchpair.py); REPEATS rounds of the workload."),
) -> None:
    """Prefill/decode tok/s: port vs vLLM native vs Transformers backend vs HF generate (one process each)."""
    from porter.bench import render, run_bench, to_json
    from porter.verify import resolve_port

    port_dir = resolve_port(model)
    if not (port_dir / "PORT.json").exists():
        _fail(PorterError(f"no port for {model!r} (no {port_dir}/PORT.json)", construct="porter bench"))
    if paired:
        from porter import benchpair

        got = benchpair.run(model, repeats)
        print(json.dumps(got, indent=2) if as_json else benchpair.render(model, got))
        return
    res = run_bench(model, repeats=repeats, sessions=sessions or None, paths=tuple(paths.split(",")), enforce_eager=not compile_,
                    log=lambda m: sys.stderr.write(f"{m}\n"))
    print(to_json(res) if as_json else render(res))


def main() -> None:  # pragma: no cover
    try:
        app()
    except PorterError as exc:
        sys.stderr.write(f"porter: error: {exc.one_line()}\n")
        sys.exit(2)
