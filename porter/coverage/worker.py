"""One conversion of the sweep, run in a worker process: a model type converted for both targets
in memory, never raising; a diagnostic porter gave without a line or a construct is completed
from the source (and marked as located by coverage)."""

from __future__ import annotations

import ast
import re
import time
import traceback
from pathlib import Path

from porter.coverage.cache import files_digest
from porter.coverage.common import TARGETS, first_line


def locate(text: str, construct: str | None, hf_class: str) -> int | None:
    """A line for a diagnostic porter gave without one: the construct's definition, else its
    first use outside the imports, else the causal-LM class."""
    if construct and construct not in ("module", "SRC"):
        parts = construct.split(".")
        line = first_line(text, rf"^\s*(class|def) {re.escape(parts[0])}\b")
        if line and len(parts) > 1:
            start = sum(len(x) + 1 for x in text.splitlines()[: line - 1])
            sub = first_line(text[start:], rf"^\s*(class|def) {re.escape(parts[-1])}\b")
            if sub:
                return line + sub - 1
        if line:
            return line
        name = re.escape(parts[-1])
        for i, ln in enumerate(text.splitlines(), 1):
            s = ln.strip()
            if re.search(rf"\b{name}\b", ln) and not s.startswith(("from ", "import ", "#")):
                return i
        line = first_line(text, rf"\b{name}\b")
        if line:
            return line
    return first_line(text, rf"^class {re.escape(hf_class)}\(")


def complete(rec: dict, hf_class: str, source: str, text: str) -> dict:
    """Fill in what porter's diagnostic left out, from the source: the line (the construct's
    definition or first use, else the causal-LM class) and the construct (the class / def around
    the line); both are marked as located by coverage. Returns the fields to update."""
    from porter.errors import PorterError

    line, construct = rec.get("line"), rec.get("construct")
    upd = {"line_located_by_coverage": bool(rec.get("line_located_by_coverage")),
           "construct_located_by_coverage": bool(rec.get("construct_located_by_coverage"))}
    if rec.get("file") == source:
        if line is None:
            line = locate(text, construct, hf_class)
            upd["line_located_by_coverage"] = line is not None
        if not construct and line:
            construct = _enclosing(text, line)
            upd["construct_located_by_coverage"] = construct is not None
    upd.update(line=line, construct=construct, diagnostic=PorterError(
        rec["message"], file=rec["file"], line=line, construct=construct, rule=rec.get("rule")).one_line())
    return upd


def _enclosing(text: str, line: int) -> str | None:
    """The innermost class / def around LINE ("Class.method"), or the statement's first name."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    best: list[str] = []

    def walk(node: ast.AST, path: list[str]) -> None:
        nonlocal best
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                if start <= line <= (child.end_lineno or child.lineno):
                    best = path + [child.name]
                    walk(child, best)
    walk(tree, [])
    if best:
        return ".".join(best)
    for node in tree.body:
        if node.lineno <= line <= (node.end_lineno or node.lineno):
            names = [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]
            return names[0] if names else None
    return None


def convert_task(model_type: str, hf_class: str, source: str, tf_root: str,
                 release: str | None = None, config_only: bool = False) -> dict:
    """Convert one modeling file for both targets in memory; never raises. With RELEASE (day
    zero) it is read from that release's tree as `porter convert X --transformers RELEASE` does;
    a config-only model type is converted by its name (its config, the other family's class)."""
    from porter.convert import convert
    from porter.errors import PorterError

    t0 = time.time()
    path = Path(tf_root) / source
    rec: dict = {"model_type": model_type}
    try:
        results = convert(model_type if config_only else str(path), list(TARGETS), Path("/nonexistent"),
                          write=False, transformers=release)
    except PorterError as e:
        text = path.read_text(encoding="utf-8")
        file = e.file or str(path)
        try:
            file = str(Path(file).resolve().relative_to(Path(tf_root).resolve()))
        except ValueError:
            pass
        rec.update(status="blocked", message=e.message, file=file, line=e.line,
                   construct=e.construct, rule=e.rule)
        rec.update(complete(rec, hf_class, source, text))
    except Exception as e:  # a porter bug, recorded as such (not a diagnostic)
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f for f in reversed(tb) if "/porter/" in f.filename), tb[-1] if tb else None)
        loc = f"{Path(where.filename).name}:{where.lineno}" if where else "?"
        rec.update(status="crashed", diagnostic=f"porter crashed: {type(e).__name__}: {e} (at {loc})",
                   message=str(e), file=source, line=None, construct=type(e).__name__, rule=None)
    else:
        vllm = next(r for r in results if r.target == "vllm")
        rec.update(status="converted", diagnostic=None, port_name=vllm.info.model_type,
                   architecture=vllm.info.architecture,
                   port_digest={r.target: files_digest(r.info.files) for r in results},
                   rules=len(vllm.rules_applied))
    rec["seconds"] = round(time.time() - t0, 2)
    return rec
