"""What `porter verify` found, and how it is shown (rich table or JSON)."""

from __future__ import annotations

import io
import json as _json
import math
from dataclasses import dataclass, field

from porter.verify.compare import Comparison

THRESHOLD = 1e-4  # max |Δ logprob| in fp32; one threshold for every model, never loosened

EXIT_PASS, EXIT_NUMERICAL, EXIT_INPUT = 0, 1, 2


@dataclass
class EngineSide:
    """One engine run (the port's, or vLLM's native class for --against-native) at one TP."""

    tp: int
    started: bool
    error: str | None = None
    built_class: str | None = None  # "module:Name" as reported by every worker
    built_classes: list[str] = field(default_factory=list)
    not_returned: list[str] = field(default_factory=list)  # params load_weights did not return
    unwritten: dict[str, float] = field(default_factory=dict)  # param -> fraction never written
    comparison: Comparison | None = None
    engine_start_s: float | None = None
    wall_s: float = 0.0
    log_tail: str = ""
    compilation_mode: str | None = None  # the engine's CompilationMode name (NONE: eager)

    @property
    def unfilled(self) -> list[str]:
        names = set(self.not_returned) | set(self.unwritten)
        return sorted(names)

    def to_dict(self) -> dict:
        return {
            "tp": self.tp,
            "started": self.started,
            "error": self.error,
            "built_class": self.built_class,
            "built_classes": self.built_classes,
            "unfilled": self.unfilled,
            "not_returned_by_load_weights": self.not_returned,
            "unwritten_fraction": self.unwritten,
            "comparison": self.comparison.to_dict() if self.comparison else None,
            "engine_start_s": self.engine_start_s,
            "compilation_mode": self.compilation_mode,
            "wall_s": round(self.wall_s, 2),
        }


@dataclass
class TPResult:
    tp: int
    port: EngineSide
    native: EngineSide | None = None
    class_ok: bool = False

    def to_dict(self) -> dict:
        return {
            "tp": self.tp,
            "class_ok": self.class_ok,
            "port": self.port.to_dict(),
            "native": self.native.to_dict() if self.native else None,
        }


@dataclass
class VerifyReport:
    port_dir: str
    tps: list[int]
    threshold: float = THRESHOLD
    model_type: str | None = None
    architecture: str | None = None
    hf_architecture: str | None = None
    expected_module: str | None = None
    expected_class: str | None = None  # "module:Class" the port registers
    exit_code: int = EXIT_INPUT
    reason: str = ""
    results: list[TPResult] = field(default_factory=list)
    distinct_tokens: list[int] = field(default_factory=list)  # per reference continuation
    prompt_lengths: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    # where the HF reference ran: "in-process", or "transformers X (<venv python>)" for a port
    # converted from a release newer than the engine's
    hf_side: str = ""
    experts_routed: dict[str, list[int]] = field(default_factory=dict)  # MoE router -> experts used (HF)
    # the machine's CPU: arch, AVX2/AVX-512/AMX flags, the vLLM kernel build (porter/verify/cpu.py)
    cpu: dict = field(default_factory=dict)
    verdict: str = ""  # where the verdict of this run was written (porter/verify/verdicts.py), if anywhere
    # a run on a real checkpoint (verify --checkpoint DIR, porter/verify/checkpoint.py)
    checkpoint: str = ""
    skipped_tps: dict[str, str] = field(default_factory=dict)  # TP -> why the model cannot run it
    chat_template: bool = False
    prompt_texts: list[str] = field(default_factory=list)
    reference_texts: list[str] = field(default_factory=list)  # HF greedy answers, up to EOS
    engine_texts: dict[str, list[str]] = field(default_factory=dict)  # "port TP=1" -> answers

    @property
    def passed(self) -> bool:
        return self.exit_code == EXIT_PASS

    def to_dict(self) -> dict:
        return {
            "port_dir": self.port_dir,
            "model_type": self.model_type,
            "architecture": self.architecture,
            "hf_architecture": self.hf_architecture,
            "expected_module": self.expected_module,
            "expected_class": self.expected_class,
            "tps": self.tps,
            "threshold": self.threshold,
            "passed": self.passed,
            "exit_code": self.exit_code,
            "reason": self.reason,
            "prompt_lengths": self.prompt_lengths,
            "distinct_reference_tokens": self.distinct_tokens,
            **({"experts_routed": self.experts_routed} if self.experts_routed else {}),
            "results": [r.to_dict() for r in self.results],
            "timings_s": self.timings,
            "hf_side": self.hf_side,
            "cpu": self.cpu,
            **({"verdict": self.verdict} if self.verdict else {}),
            **({"checkpoint": {
                "dir": self.checkpoint, "skipped_tps": self.skipped_tps,
                "chat_template": self.chat_template, "prompts": self.prompt_texts,
                "hf_texts": self.reference_texts, "engine_texts": self.engine_texts,
            }} if self.checkpoint else {}),
        }


def _delta(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2e}" if math.isfinite(x) else str(x)


def _tokens(c: Comparison | None) -> str:
    if c is None:
        return "-"
    if c.tokens_equal:
        return "equal"
    d = c.first_token_diff or {}
    return f"differ: prompt {d.get('prompt')} step {d.get('step')} (hf {d.get('hf')}, engine {d.get('engine')})"


def _side_cells(side: EngineSide, threshold: float) -> list[str]:
    c = side.comparison
    if not side.started:
        return ["[red]did not start[/]", "-", "-"]

    def colour(x: float) -> str:
        return f"[green]{_delta(x)}[/]" if x <= threshold else f"[red]{_delta(x)}[/]"

    return [
        colour(c.max_delta_prompt),
        colour(c.max_delta_decode),
        _tokens(c) if c.tokens_equal else f"[red]{_tokens(c)}[/]",
    ]


def _print_checkpoint(console, report: VerifyReport) -> None:
    if not report.checkpoint:
        return
    for tp, why in report.skipped_tps.items():
        console.print(f"TP={tp} skipped: {why}", markup=False)
    how = "its chat template" if report.chat_template else "its tokenizer (no chat template)"
    console.print(f"prompts through {how}; greedy answers (HF):")
    for i, (prompt, text) in enumerate(zip(report.prompt_texts, report.reference_texts)):
        console.print(f"  [{i}] {prompt!r} -> {text!r}", markup=False, soft_wrap=True)
        for run, texts in report.engine_texts.items():
            if i < len(texts) and texts[i] != text:
                console.print(f"      {run}: {texts[i]!r}", markup=False, soft_wrap=True)


def render_report(report: VerifyReport, json: bool = False) -> str:
    if json:
        return _json.dumps(report.to_dict(), indent=2, sort_keys=False)
    from rich.console import Console
    from rich.table import Table

    buf = io.StringIO()
    console = Console(file=buf, width=160, force_terminal=False, color_system=None)
    title = f"porter verify {report.model_type or ''} ({report.architecture or report.port_dir})"
    table = Table(title=title, show_lines=True)
    for col in (
        "TP",
        "run",
        "max |Δ| prompt",
        "max |Δ| decode",
        "greedy tokens",
        "unfilled params",
        "built class",
        "engine start / wall",
    ):
        table.add_column(col, overflow="fold")
    for r in report.results:
        rows = [("port", r.port)] + ([("native", r.native)] if r.native else [])
        for label, side in rows:
            cells = _side_cells(side, report.threshold)
            unfilled = ", ".join(side.unfilled[:6]) + (" …" if len(side.unfilled) > 6 else "")
            built = side.built_class or "-"
            if label == "port" and side.built_class and not r.class_ok:
                built = f"[red]{built}[/]"
            start = f"{side.engine_start_s:.1f}s" if side.engine_start_s else "-"
            table.add_row(
                str(r.tp), label, *cells, unfilled or "none", built, f"{start} / {side.wall_s:.1f}s"
            )
    if report.results:
        console.print(table)
    if report.cpu:
        from porter.verify.cpu import describe

        console.print(f"CPU: {describe(report.cpu)}")
    if report.hf_side and report.hf_side != "in-process":
        console.print(f"HF reference: {report.hf_side}")
    for name, experts in report.experts_routed.items():
        console.print(f"HF router {name}: prompts routed to experts {experts}")
    for r in report.results:
        for label, side in (("port", r.port), ("native", r.native)):
            if side is None:
                continue
            c = side.comparison
            if side.error:
                console.print(f"TP={r.tp} {label}: {side.error}")
            elif c and c.first_over:
                console.print(
                    f"TP={r.tp} {label}: first |Δ| > {report.threshold:g} at {c.first_over}"
                )
                console.print(f"TP={r.tp} {label}: largest |Δ| at {c.worst}")
    _print_checkpoint(console, report)
    verdict = {
        EXIT_PASS: "PASS",
        EXIT_NUMERICAL: "FAIL (numerical)",
        EXIT_INPUT: "ERROR (input / load)",
    }[report.exit_code]
    console.print(f"{verdict} (exit {report.exit_code}): {report.reason}")
    if report.verdict:
        console.print(f"verdict written: {report.verdict}")
    return buf.getvalue()
