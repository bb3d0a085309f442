"""`porter verify`: run a port in the real engine and compare it with the HF model it came from.

Usage: ``report = run_verify(Path("generated/vllm/opt"), tps=[1, 2])``, then
``print(render_report(report, json=False))`` and ``sys.exit(report.exit_code)``
(0 pass, 1 numerical failure, 2 bad input or a port that cannot load; ``report.reason`` says why).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from porter.layout import PORT_JSON, PortInfo
from porter.verify import verdicts
from porter.verify.compare import compare
from porter.verify.cpu import cpu_features
from porter.verify.engine import EngineRun, Start, run_engines
from porter.verify.report import (
    EXIT_INPUT,
    EXIT_NUMERICAL,
    EXIT_PASS,
    THRESHOLD,
    EngineSide,
    TPResult,
    VerifyReport,
    render_report,
)
from porter.verify.hfref import LocalHF, OtherEnvHF
from porter.verify.tiny import VerifyInputError, with_architecture

__all__ = ["run_verify", "render_report", "resolve_port", "VerifyReport", "THRESHOLD"]

Progress = Callable[[str], None]


def resolve_port(arg: str | Path, target: str = "vllm", root: Path = Path("generated")) -> Path:
    """A port directory, or the committed port ``root/<target>/<arg>`` for a model type."""
    p = Path(arg)
    if (p / PORT_JSON).exists():
        return p
    candidate = Path(root) / target / str(arg)
    return candidate if (candidate / PORT_JSON).exists() else p


@contextlib.contextmanager
def _progress_sink(progress: Progress | None):
    if progress is not None:
        yield progress
        return
    from porter.progress import progress as shown

    with shown("porter verify") as say:  # a status line on a terminal, else a line per stage
        yield say


def registered_class(info: PortInfo) -> str | None:
    """The "module:Class" the port's register() hands to the engine (read with ast, not run)."""
    import ast

    init = Path(info.path) / info.package / "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(init.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            module, _, name = node.value.partition(":")
            if name.isidentifier() and (
                module == info.package or module.startswith(info.package + ".")
            ):
                found.add(node.value)
    return found.pop() if len(found) == 1 else None


def _side(run: EngineRun) -> EngineSide:
    side = EngineSide(
        tp=run.tp,
        started=run.ok,
        error=run.error,
        wall_s=run.wall_s,
        engine_start_s=run.engine_start_s,
        log_tail=run.log_tail,
        compilation_mode=run.compilation_mode,
    )
    classes = []
    for w in run.workers:
        if w.get("module"):
            classes.append(f"{w['module']}:{w['name']}")
        side.not_returned = sorted(set(side.not_returned) | set(w.get("not_returned") or []))
        for name, frac in (w.get("unwritten") or {}).items():
            side.unwritten[name] = max(frac, side.unwritten.get(name, 0.0))
    side.built_classes = classes
    if classes:
        side.built_class = (
            classes[0] if len(set(classes)) == 1 else " | ".join(sorted(set(classes)))
        )
    return side


def run_verify(
    port_dir: Path,
    tps: list[int],
    against_native: bool = False,
    progress: Progress | None = None,
    compiled: bool = False,
    checkpoint: Path | None = None,
    prompts_file: Path | None = None,
) -> VerifyReport:
    """Verify the port on its tiny seeded checkpoint, or with ``checkpoint`` on that real HF
    checkpoint folder and real text (``prompts_file``, else porter's own prompts)."""
    port_dir = Path(port_dir)
    report = VerifyReport(port_dir=str(port_dir), tps=list(tps), cpu=cpu_features())
    t_all = time.time()
    # what the verdict depends on, as it was when the run started (porter/verify/verdicts.py)
    # (a run on a real checkpoint is not the port's verdict: that is the tiny seeded one)
    inputs = (verdicts.inputs(port_dir) if verdicts.is_committed(port_dir) and checkpoint is None
              else None)
    with _progress_sink(progress) as say:
        try:
            _run(report, port_dir, list(tps), against_native, say, compiled,
                 real=(Path(checkpoint), prompts_file) if checkpoint is not None else None)
        except VerifyInputError as e:
            report.exit_code, report.reason = EXIT_INPUT, str(e)
    report.timings["total"] = round(time.time() - t_all, 2)
    written = verdicts.record(port_dir, report, inputs, compiled=compiled)
    report.verdict = str(written.relative_to(verdicts.REPO)) if written else ""
    return report


def _run(
    report: VerifyReport, port_dir: Path, tps: list[int], against_native: bool, say: Progress,
    compiled: bool = False, real: tuple[Path, Path | None] | None = None,
) -> None:
    if not tps or any(t < 1 for t in tps):
        raise VerifyInputError(f"bad TP list {tps}")
    if not (port_dir / PORT_JSON).exists():
        raise VerifyInputError(f"{port_dir} is not a port directory (no {PORT_JSON})")
    try:
        info = PortInfo.load(port_dir)
    except Exception as e:
        raise VerifyInputError(f"{port_dir / PORT_JSON} is unreadable: {e}") from e
    info.path = port_dir.resolve()
    if not (info.path / info.package / "__init__.py").exists():
        raise VerifyInputError(f"{port_dir} has no package {info.package}/__init__.py")
    report.model_type, report.architecture = info.model_type, info.architecture
    report.hf_architecture, report.expected_module = info.hf_architecture, info.module
    try:
        report.expected_class = registered_class(info)
    except SyntaxError as e:
        raise VerifyInputError(f"{info.package}/__init__.py does not parse: {e}") from e
    if real is not None:
        from porter.verify.checkpoint import check_real

        tps, real = check_real(report, info, tps, *real, say)

    with tempfile.TemporaryDirectory(prefix="porter-verify-") as tmp:
        _run_in(report, info, tps, against_native, say, Path(tmp), compiled=compiled, real=real)
    _verdict(report, info)


def hf_side(info: PortInfo, work: Path, say: Progress = print):
    """The HF reference for the port: in this process when the port's transformers release is the
    installed one, else in the venv of that release (porter/verify/hfenv.py); for a port of remote
    code, that code run in a subprocess (porter/verify/remote_side.py)."""
    from porter.source import installed_transformers_version
    from porter.verify.hfenv import env_dir, env_python

    if info.remote:
        return remote_hf(info, work, say)
    version = info.transformers_version
    if version in ("", "unknown", installed_transformers_version()):
        from porter.verify.tiny import causal_config_type

        return LocalHF(info.model_type, info.hf_architecture, info.config_model_type
                       or causal_config_type(info.model_type, info.hf_architecture))
    python = env_python(version)
    if not python.is_file():
        raise VerifyInputError(
            f"the port was converted from transformers {version}, not the installed "
            f"{installed_transformers_version()}: its HF reference runs in {env_dir(version)}, which "
            "is missing (make setup builds it; or python -m porter.verify.hfenv)")
    return OtherEnvHF(python, work / "hf", info.model_type, info.hf_architecture,
                      info.architecture, info.config_model_type)


def remote_hf(info: PortInfo, work: Path, say: Progress):
    """The reference of a remote-code port: the recorded repository folder, unchanged since
    convert, its code run in a subprocess under the engine's python or, with
    PORTER_REFERENCE_TRANSFORMERS (`porter verify --reference-transformers X`), the venv of release X."""
    import json
    import os

    from porter.remote import changed_sources, recorded_folder
    from porter.verify.hfenv import env_dir, env_python
    from porter.verify.remote_side import RemoteHF, parse_tiny

    folder = recorded_folder(info.remote)
    changed = changed_sources(info.remote)
    if changed:
        raise VerifyInputError(f"the port's source files in {folder} are missing or changed since "
                               f"convert: {', '.join(changed)} (convert again)")
    python = None
    if version := os.environ.get("PORTER_REFERENCE_TRANSFORMERS"):
        python = env_python(version)
        if not python.is_file():
            raise VerifyInputError(f"--reference-transformers {version}: {env_dir(version)} is missing "
                                   "(python -m porter.verify.hfenv builds it)")
    tiny = json.loads(os.environ.get("PORTER_TINY_OVERRIDES") or "{}")
    if isinstance(tiny, list):
        tiny = parse_tiny(tiny)
    return RemoteHF(folder, work / "hf", info.architecture, tiny=tiny, python=python, say=say)


def _tiny_reference(report: VerifyReport, info: PortInfo, tmp: Path, say: Progress = print):
    try:
        hf = hf_side(info, tmp, say)
        report.hf_side = (f"transformers {info.transformers_version} ({hf.python})"
                          if isinstance(hf, OtherEnvHF) else
                          f"remote code, in a subprocess ({hf.python})" if info.remote else "in-process")
    except VerifyInputError:
        raise
    except Exception as e:  # the HF model itself fails on the tiny config: no reference to compare
        first = (str(e).strip().splitlines() or [""])[0]
        raise VerifyInputError(
            f"the HF reference ({info.hf_architecture} on the tiny config of rules/tiny_configs.yaml) "
            f"failed: {type(e).__name__}: {first}") from e
    return hf


def _reference(report: VerifyReport, info: PortInfo, say: Progress, tmp: Path,
               real: tuple[Path, list[str]] | None = None):
    """The HF side on the tiny config: its prompts and reference continuations, refused as bad
    input when they would prove little (too few distinct tokens, MoE routers that send the
    prompts to fewer than 2 experts). With REAL (a checkpoint folder and prompt texts): that
    folder's model and text (porter/verify/checkpoint.py)."""
    t0 = time.time()
    if real is not None:
        from porter.verify.checkpoint import real_reference

        hf = real_reference(report, info, say, *real, work=tmp)
    else:
        say(f"building tiny {info.model_type} reference")
        hf = _tiny_reference(report, info, tmp, say)
    spec, prompts, refs = hf.spec, hf.prompts, hf.refs
    report.prompt_lengths = [len(p) for p in prompts]
    report.distinct_tokens = [len(set(r["tokens"])) for r in refs]
    few = [i for i, n in enumerate(report.distinct_tokens) if n < spec.min_distinct_tokens]
    if few:
        raise VerifyInputError(
            f"reference continuations of prompts {few} have fewer than {spec.min_distinct_tokens} "
            f"distinct tokens ({report.distinct_tokens}): equal tokens would prove little; "
            "change the init in rules/tiny_configs.yaml"
        )
    # (the experts read the indices; an inline block's experts are one module per expert: see experts_routed)
    routers = [mp["experts_cls"] if mp.get("route_method") or mp.get("inline") else mp["router_cls"]
               for mp in (info.plan or {}).get("moes", [])]
    if routers:
        # each MoE layer must route the test prompts to more than one expert, or the experts'
        # weights and their mapping are hardly exercised
        report.experts_routed = hf.experts_routed(routers)  # (in the release's env for a day-zero port)
        one = [name for name, experts in report.experts_routed.items() if len(experts) < 2]
        if one or not report.experts_routed:
            raise VerifyInputError(
                f"MoE routers {one or routers} send the test prompts to fewer than 2 experts "
                f"({report.experts_routed}): change the init in rules/tiny_configs.yaml")
    report.timings["reference"] = round(time.time() - t0, 2)
    return hf


def _run_in(
    report: VerifyReport, info: PortInfo, tps: list[int], against_native: bool, say: Progress,
    tmp: Path, *, compiled: bool, real: tuple[Path, list[str]] | None = None,
) -> None:
    hf = _reference(report, info, say, tmp, real)
    spec, prompts, refs = hf.spec, hf.prompts, hf.refs
    hf_tokens = [r["tokens"] for r in refs]
    max_model_len = -(-(max(report.prompt_lengths) + spec.max_new_tokens) // 32) * 32

    rows_cache: dict[tuple, object] = {}

    def rows_for(results):
        seqs = [list(res["prompt"]) + list(res["tokens"]) for res in results]
        missing = [s for s in seqs if tuple(s) not in rows_cache]
        for s, rows in zip(missing, hf.logprobs(missing) if missing else []):
            rows_cache[tuple(s)] = rows
        return [rows_cache[tuple(s)] for s in seqs]

    def relay(tp: int, label: str):
        t_start = time.time()

        def say_stage(text: str) -> None:
            say(f"{info.model_type} TP={tp} {label}: {text} ({time.time() - t_start:.0f}s)")

        return say_stage

    def side_of(run, tp: int, label: str) -> EngineSide:
        side = _side(run)
        if run.ok and hasattr(hf, "decode"):  # a real checkpoint: the text a user would read
            report.engine_texts[f"{label} TP={tp}"] = [hf.decode(r["tokens"]) for r in run.results]
        if run.ok:
            if [r["prompt"] for r in run.results] != prompts:
                side.started, side.error = False, "engine returned results for other prompts"
            else:
                side.comparison = compare(
                    rows_for(run.results), hf_tokens, run.results, spec.top_logprobs, THRESHOLD
                )
        report.timings[f"{label}_tp{tp}"] = round(run.wall_s, 2)
        return side

    ckpt = hf.checkpoint(tmp / "port-ckpt", info.architecture)
    native_ckpt = (
        with_architecture(ckpt, tmp / "native-ckpt", info.hf_architecture)
        if against_native
        else None
    )
    # every start in one engine process (vLLM imported once; a failed start is run again alone):
    # the port at each TP, and the engine's native class on the checkpoint naming the HF
    # architecture (the port registers its own name, Porter<Architecture>, so it never stands in)
    wanted = [(tp, label, c) for tp in tps
              for label, c in (("port", ckpt), ("native", native_ckpt)) if c is not None]
    runs = run_engines([Start(c, tp, relay(tp, label)) for tp, label, c in wanted], prompts, port=info,
                       max_tokens=spec.max_new_tokens, top_logprobs=spec.top_logprobs,
                       max_model_len=max_model_len, enforce_eager=not compiled)
    sides = {(tp, label): side_of(run, tp, label) for (tp, label, _), run in zip(wanted, runs, strict=True)}
    for tp in tps:
        result = TPResult(tp=tp, port=sides[tp, "port"])
        built = result.port.built_classes
        if report.expected_class:
            result.class_ok = bool(built) and all(c == report.expected_class for c in built)
        else:  # no single registration target found: the class must come from the port
            result.class_ok = bool(built) and all(
                c.split(":", 1)[0].startswith(info.package + ".") for c in built
            )
        result.native = sides.get((tp, "native"))
        report.results.append(result)


def _verdict(report: VerifyReport, info: PortInfo) -> None:
    load_problems, numeric = [], []
    for r in report.results:
        p = r.port
        if not p.started:
            load_problems.append(
                f"TP={r.tp}: the port failed in the engine: {p.error}"
                + (f" (unfilled: {', '.join(p.unfilled)})" if p.unfilled else "")
            )
            continue
        if not r.class_ok:
            load_problems.append(
                f"TP={r.tp}: the engine built {p.built_class or 'an unknown class'}, "
                f"not the port's class {report.expected_class or 'from ' + info.package}: "
                "the port did not run"
            )
        if p.unfilled:
            load_problems.append(
                f"TP={r.tp}: parameters left unfilled by load_weights: " + ", ".join(p.unfilled)
            )
        c = p.comparison
        if c.max_delta > report.threshold:
            numeric.append(
                f"TP={r.tp}: max |Δ| {c.max_delta:.2e} > {report.threshold:g}; "
                f"first at {c.first_over}"
            )
        if not c.tokens_equal:
            d = c.first_token_diff
            numeric.append(
                f"TP={r.tp}: greedy tokens differ first at prompt {d['prompt']} "
                f"step {d['step']} (hf {d['hf']}, engine {d['engine']})"
            )
    if load_problems:
        report.exit_code, report.reason = EXIT_INPUT, "; ".join(load_problems + numeric)
    elif numeric:
        report.exit_code, report.reason = EXIT_NUMERICAL, "; ".join(numeric)
    else:
        worst = max(r.port.comparison.max_delta for r in report.results)
        report.exit_code = EXIT_PASS
        report.reason = (
            f"max |Δ| {worst:.2e} <= {report.threshold:g} and equal greedy tokens "
            f"at TP={','.join(str(t) for t in report.tps)}"
        )
