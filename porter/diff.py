"""`porter diff`: the HF source against the port, class by class and method by method.

Every hunk is labelled with the rules that the rewrite *recorded* for its scope while it ran
(`Converted.provenance`, see `Rule.mark`): a method hunk carries the codes of "Class.method" and
"Class", a class-level hunk those of "Class", module-level code those of "<module>", a removed
top-level definition those of its own name. Nothing is inferred from the text of the hunk; a hunk
whose scope recorded nothing has an empty label (a provenance gap, which the tests reject).

Both sides are formatted with the formatter the port is written with (ruff, line length 100), so
hunks show rewrites and not HF's wider line length. The port's generated header (comments from
templates/header.py.j2) is not a rewrite and is reported separately.
"""

from __future__ import annotations

import ast
import difflib
import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from porter.errors import PorterError

CONTEXT = 3
MODULE = "<module>"


@dataclass
class Row:
    op: str  # " " same, "-" HF only, "+" port only
    old: int | None  # line number in the (formatted) HF source
    new: int | None  # line number in the port module
    text: str


@dataclass
class Hunk:
    scope: str  # "Class.method", "Class", "function" or "<module>"
    kind: str  # "changed" | "removed" (only in HF) | "added" (only in the port)
    rules: list[dict]  # [{"code", "name"}], from the recorded provenance
    rows: list[Row] = field(default_factory=list)

    @property
    def codes(self) -> list[str]:
        return [r["code"] for r in self.rules]

    @property
    def header(self) -> str:
        old = [r.old for r in self.rows if r.old is not None]
        new = [r.new for r in self.rows if r.new is not None]
        o = f"-{old[0]},{len(old)}" if old else "-0,0"
        n = f"+{new[0]},{len(new)}" if new else "+0,0"
        return f"@@ {o} {n} @@"

    @property
    def lines(self) -> list[str]:
        return [r.op + r.text for r in self.rows]

    def to_dict(self) -> dict:
        return {"scope": self.scope, "kind": self.kind, "rules": self.rules,
                "header": self.header, "lines": self.lines}


@dataclass
class PortDiff:
    model_type: str
    target: str
    source: str  # HF file, relative to transformers when it lives there
    port_module: str  # relpath of the port module inside the port directory
    header_lines: int  # lines of the generated header (not a rewrite, not diffed)
    hunks: list[Hunk]
    provenance: dict[str, list[str]]
    hf_class: str = ""  # the causal LM (the port keeps its name)

    def rule_codes(self) -> list[str]:
        return sorted({c for h in self.hunks for c in h.codes})


# -- splitting a module into scopes ----------------------------------------------------------

@dataclass
class Segment:
    scope: str
    lines: list[tuple[int, str]]  # (1-based line number, text)

    @property
    def texts(self) -> list[str]:
        return [t for _, t in self.lines]


def _span(node: ast.stmt, src: list[str]) -> tuple[int, int]:
    """1-based line span of a definition with its decorators and the comment lines right above it."""
    start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    while start > 1 and src[start - 2].lstrip().startswith("#"):
        start -= 1
    return start, node.end_lineno or node.lineno


def _tidy(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Blank lines are layout: drop those at the edges, at the gaps left by nested definitions,
    and runs of more than one."""
    out: list[tuple[int, str]] = []
    for n, t in lines:
        gap = bool(out) and out[-1][0] != n - 1
        if gap:
            while out and not out[-1][1].strip():
                out.pop()
        if not t.strip() and (not out or gap or not out[-1][1].strip()):
            continue
        out.append((n, t))
    while out and not out[-1][1].strip():
        out.pop()
    return out


def segments(text: str, skip: int = 0) -> tuple[dict[str, Segment], list[str]]:
    """Scopes of a module: "<module>" (all top-level code outside definitions), each top-level
    function, each class (its own lines: header, docstring, attributes) and "Class.method".
    Returns the segments and the top-level order of definitions. The first `skip` lines are left out."""
    src = text.splitlines()
    tree = ast.parse(text)
    owner: list[str | None] = [MODULE] * len(src)
    for i in range(min(skip, len(src))):
        owner[i] = None
    order: list[str] = []
    for node in tree.body:
        if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        order.append(node.name)
        a, b = _span(node, src)
        for i in range(a - 1, b):
            owner[i] = node.name
        if isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    sa, sb = _span(sub, src)
                    for i in range(sa - 1, sb):
                        owner[i] = f"{node.name}.{sub.name}"
                    order.append(f"{node.name}.{sub.name}")
    segs: dict[str, Segment] = {}
    for i, (scope, line) in enumerate(zip(owner, src)):
        if scope is not None:
            segs.setdefault(scope, Segment(scope, [])).lines.append((i + 1, line))
    for seg in segs.values():
        seg.lines = _tidy(seg.lines)
    return segs, order


def header_length(port_text: str) -> int:
    """Lines of porter's generated header: the leading comment block up to the first blank line."""
    lines = port_text.splitlines()
    if not lines or not lines[0].startswith("# Generated by porter"):
        return 0
    n = 0
    while n < len(lines) and lines[n].startswith("#"):
        n += 1
    while n < len(lines) and not lines[n].strip():
        n += 1
    return n


# -- hunks -----------------------------------------------------------------------------------

def _rules(codes: set[str]) -> list[dict]:
    from porter.passes import REGISTRY

    return [{"code": c, "name": REGISTRY[c].name if c in REGISTRY else "?"} for c in sorted(codes)]


def scope_codes(prov: dict[str, list[str]], scope: str) -> set[str]:
    """Recorded rules for a scope: a method's own and its class's; anything else its own."""
    codes = set(prov.get(scope, ()))
    if "." in scope:
        codes |= set(prov.get(scope.split(".", 1)[0], ()))
    return codes


def diff_segments(old: Segment | None, new: Segment | None, scope: str,
                  prov: dict[str, list[str]]) -> list[Hunk]:
    rules = _rules(scope_codes(prov, scope))
    if new is None or old is None:
        seg, op, kind = (old, "-", "removed") if new is None else (new, "+", "added")
        if seg is None or not seg.lines:
            return []
        rows = [Row(op, n if op == "-" else None, n if op == "+" else None, t) for n, t in seg.lines]
        return [Hunk(scope, kind, rules, rows)]
    a, b = old.texts, new.texts
    hunks = []
    sm = difflib.SequenceMatcher(None, a, b, autojunk=False)
    for group in sm.get_grouped_opcodes(CONTEXT):
        rows: list[Row] = []
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                rows += [Row(" ", old.lines[i][0], new.lines[j][0], a[i])
                         for i, j in zip(range(i1, i2), range(j1, j2))]
                continue
            rows += [Row("-", old.lines[i][0], None, a[i]) for i in range(i1, i2)]
            rows += [Row("+", None, new.lines[j][0], b[j]) for j in range(j1, j2)]
        hunks.append(Hunk(scope, "changed", rules, rows))
    return hunks


def _normalise(text: str) -> str:
    from porter.convert import ruff_format

    try:
        return ruff_format(text)
    except PorterError:
        return text


def diff_texts(hf_text: str, port_text: str, prov: dict[str, list[str]]) -> tuple[list[Hunk], int]:
    hf_text = _normalise(hf_text)
    skip = header_length(port_text)
    old, old_order = segments(hf_text)
    new, new_order = segments(port_text, skip=skip)
    # HF order first; a scope only the port has goes right after the scope before it in the port
    order = [MODULE] + old_order
    for i, scope in enumerate(new_order):
        if scope not in order:
            prev = new_order[i - 1] if i else MODULE
            # after prev and everything nested in it
            k = order.index(prev) + 1 if prev in order else len(order)
            while k < len(order) and order[k].startswith(prev + "."):
                k += 1
            order.insert(k, scope)
    hunks: list[Hunk] = []
    for scope in order:
        parent = scope.split(".", 1)[0]
        if "." in scope and parent in old and parent not in new:
            continue  # the whole class is removed: one hunk for it
        o, n = old.get(scope), new.get(scope)
        if "." not in scope and o is not None and n is None and scope != MODULE:
            # a removed class: its own lines and all its methods' lines, in source order
            lines = sorted(
                ln for s, seg in old.items() if s == scope or s.startswith(scope + ".") for ln in seg.lines
            )
            o = Segment(scope, lines)
        hunks += diff_segments(o, n, scope, prov)
    return hunks, skip


def diff_port(src: str, target: str = "vllm", config: str | None = None) -> PortDiff:
    """Convert SRC in memory (as `porter convert` would) and diff the HF file against the port.

    SRC is a modeling file, a model type, or a committed port directory (with PORT.json): then the
    target is the port's, and the committed port must be what porter generates now (the recorded
    provenance belongs to the regenerated text)."""
    info = _committed(src)
    return diff_targets(src, [info.target if info else target], config)[0]


def _committed(src: str):
    """The PortInfo of SRC when it is a committed port directory (with PORT.json), else None."""
    from porter.layout import PORT_JSON, PortInfo

    p = Path(src)
    return PortInfo.load(p) if p.is_dir() and (p / PORT_JSON).is_file() else None


def diff_targets(src: str, targets: list[str], config: str | None = None) -> list[PortDiff]:
    """diff_port for each of TARGETS from one analysis (the rewrite passes the targets share run
    once, as in `porter convert`). SRC a committed port directory (generated/<target>/<model>): the
    ports diffed are its siblings of TARGETS (generated/<each target>/<model>)."""
    from porter.convert import analyse, convert_targets, resolve_release
    from porter.layout import files_differing, port_files
    from porter.rules_data import get_target

    committed: dict[str, Path] = {}
    release = None
    info = _committed(src)
    if info is not None:
        p = Path(src)
        src, release = info.model_type, info.transformers_version  # a day-zero port: a newer wheel
        committed = {t: p.parent.parent / t / p.name for t in targets}
    source = resolve_release(src, config=config, transformers=release)
    idx, plan = analyse(source)
    out = []
    for conv in convert_targets(source, idx, plan, [get_target(t) for t in targets]):
        module_rel = f"{conv.info.package}/modeling_{source.model_type}.py"
        port_text = conv.files[module_rel]
        if conv.target in committed:  # every file of it, as `porter regen --check` compares
            stale = files_differing(port_files(committed[conv.target]), conv.port_files())
            if stale:
                raise PorterError(
                    "committed port differs from what porter generates now (stale or edited by hand): "
                    "run `porter convert` first", file=str(committed[conv.target] / stale[0]),
                )
        hunks, skip = diff_texts(source.text, port_text, conv.provenance)
        out.append(PortDiff(source.model_type, conv.target, source.rel_path, module_rel, skip, hunks,
                            conv.provenance, plan.causal_lm or ""))
    return out


# -- rendering -------------------------------------------------------------------------------

def render_json(d: PortDiff) -> str:
    return json.dumps([h.to_dict() for h in d.hunks], indent=2)


def _label(h: Hunk) -> str:
    if not h.rules:
        return "NO RECORDED RULE"
    return ", ".join(f"{r['code']} {r['name']}" for r in h.rules)


def render_text(d: PortDiff) -> str:
    out = [f"--- HF {d.source} (ruff-formatted)", f"+++ {d.target} {d.port_module}"]
    if d.header_lines:
        out.append(f"# port lines 1-{d.header_lines}: generated header (template, not a rewrite)")
    for h in d.hunks:
        out.append(f"=== {h.scope} ({h.kind})  [{_label(h)}]")
        out.append(h.header)
        out += h.lines
    return "\n".join(out) + "\n"


def print_rich(d: PortDiff, console) -> None:
    from rich.markup import escape

    console.print(f"[bold]--- HF {escape(d.source)} (ruff-formatted)[/]")
    console.print(f"[bold]+++ {d.target} {escape(d.port_module)}[/]")
    if d.header_lines:
        console.print(f"[dim]# port lines 1-{d.header_lines}: generated header (template, not a rewrite)[/]")
    for h in d.hunks:
        label = (", ".join(f"[bold magenta]{r['code']}[/] {escape(r['name'])}" for r in h.rules)
                 if h.rules else "[bold red]NO RECORDED RULE[/]")
        console.print(f"[bold cyan]=== {escape(h.scope)}[/] [dim]({h.kind})[/]  {label}")
        console.print(f"[cyan]{h.header}[/]")
        for r in h.rows:
            style = {"-": "red", "+": "green"}.get(r.op)
            line = escape(r.op + r.text)
            console.print(f"[{style}]{line}[/]" if style else line, soft_wrap=True)


CSS = """
body{font-family:system-ui,sans-serif;margin:0 1.5rem 4rem;color:#1f2328;background:#fff}
h1{font-size:1.3rem}h2{font-size:1.1rem;margin-top:2.5rem}
.meta{color:#57606a;font-size:.9rem}
.hunk{border:1px solid #d0d7de;border-radius:6px;margin:1rem 0;overflow:hidden}
.hunk-head{background:#f6f8fa;padding:.4rem .6rem;border-bottom:1px solid #d0d7de;font-size:.9rem}
.scope{font-family:ui-monospace,monospace;font-weight:600}
.kind{color:#57606a;margin:0 .5rem}
a.rule{display:inline-block;font-family:ui-monospace,monospace;font-size:.8rem;padding:0 .4rem;
 margin:0 .15rem;border-radius:1rem;background:#ddf4ff;color:#0969da;text-decoration:none;border:1px solid #54aeff}
a.rule:hover{background:#b6e3ff}
.gap{color:#cf222e;font-weight:700}
table.sbs{width:100%;border-collapse:collapse;table-layout:fixed;font-family:ui-monospace,monospace;font-size:12px}
table.sbs col.num{width:3.5em}
table.sbs td{vertical-align:top;white-space:pre-wrap;word-break:break-all;padding:0 .4rem;line-height:1.45}
td.num{color:#8c959f;text-align:right;user-select:none}
td.del{background:#ffebe9}td.add{background:#e6ffec}td.none{background:#f6f8fa}
th{font-weight:600;text-align:left;background:#f6f8fa;font-size:.8rem;padding:.2rem .4rem}
.rule-entry{border-left:4px solid #54aeff;padding:.3rem .8rem;margin:.8rem 0}
.rule-entry:target{background:#fff8c5;border-left-color:#d4a72c}
.rule-entry .code{font-family:ui-monospace,monospace;font-weight:700}
.rule-entry .uses{color:#57606a;font-size:.85rem}
"""


def _side_by_side(h: Hunk) -> list[tuple[Row | None, Row | None]]:
    pairs: list[tuple[Row | None, Row | None]] = []
    dels: list[Row] = []
    adds: list[Row] = []

    def flush() -> None:
        for k in range(max(len(dels), len(adds))):
            pairs.append((dels[k] if k < len(dels) else None, adds[k] if k < len(adds) else None))
        dels.clear()
        adds.clear()

    for r in h.rows:
        if r.op == " ":
            flush()
            pairs.append((r, r))
        elif r.op == "-":
            if adds:
                flush()
            dels.append(r)
        else:
            adds.append(r)
    flush()
    return pairs


def render_html(d: PortDiff) -> str:
    from porter.passes.pipeline import catalogue

    e = html.escape
    uses: dict[str, int] = {}
    for h in d.hunks:
        for c in h.codes:
            uses[c] = uses.get(c, 0) + 1
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>porter diff: {e(d.model_type)} ({e(d.target)})</title><style>{CSS}</style></head><body>",
        f"<h1>porter diff: {e(d.model_type)} → {e(d.target)}</h1>",
        f"<p class='meta'>left: HF <code>{e(d.source)}</code> (ruff-formatted) · right: "
        f"<code>{e(d.port_module)}</code> · {len(d.hunks)} hunks · labels are the rules recorded "
        "for each scope while rewriting"
        + (f" · port lines 1–{d.header_lines}: generated header (not a rewrite)" if d.header_lines else "")
        + "</p>",
    ]
    for i, h in enumerate(d.hunks):
        labels = "".join(
            f"<a class='rule' href='#rule-{e(r['code'])}' title='{e(r['name'])}'>{e(r['code'])}</a>"
            for r in h.rules
        ) or "<span class='gap'>NO RECORDED RULE</span>"
        parts.append(
            f"<div class='hunk' id='hunk-{i}' data-scope='{e(h.scope)}' data-kind='{h.kind}'>"
            f"<div class='hunk-head'><span class='scope'>{e(h.scope)}</span>"
            f"<span class='kind'>{h.kind} · {e(h.header)}</span>{labels}</div>"
            "<table class='sbs'><colgroup><col class='num'><col><col class='num'><col></colgroup>"
            "<tr><th></th><th>Hugging Face</th><th></th><th>port</th></tr>"
        )
        for left, right in _side_by_side(h):
            cells = []
            for row, cls in ((left, "del"), (right, "add")):
                if row is None:
                    cells.append("<td class='num none'></td><td class='none'></td>")
                    continue
                num = row.old if cls == "del" else row.new
                c = cls if row.op != " " else ""
                cells.append(f"<td class='num'>{num}</td><td class='{c}'>{e(row.text)}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</table></div>")
    parts.append("<h2 id='rules'>Rules</h2>")
    for r in catalogue():
        n = uses.get(r.code, 0)
        parts.append(
            f"<div class='rule-entry' id='rule-{e(r.code)}'><span class='code'>{e(r.code)}</span> "
            f"<b>{e(r.name)}</b> <span class='uses'>· {n} hunk(s) here · {len(r.examples)} example(s)"
            f"</span><p>{e(r.why)}</p></div>"
        )
    parts.append("</body></html>\n")
    return "\n".join(parts)


__all__ = ["Hunk", "PortDiff", "diff_port", "diff_targets", "diff_texts", "render_html", "render_json",
           "render_text", "print_rich", "asdict"]
