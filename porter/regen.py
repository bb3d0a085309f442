"""Regenerate the committed ports from a transformers release, and report the drift.

Conversion is static, so a release need not be installed: its wheel is fetched with pip into a
cache and only ``transformers/models/**`` is unpacked from it, never imported
(``porter.source.transformers_tree``). ``regen`` converts
every committed port's model type (both targets) from that release, writes the ports, and writes
``DRIFT.md`` / ``DRIFT.json``: per model, the source sha256 before and after, which forward
signatures changed in the HF source, which rules' outputs changed (rules applied, per-scope
provenance, the port code of each scope), which generated files changed, what failed to convert
and why, and the verify result when asked for.

``check`` regenerates each committed port from the transformers version recorded in its
PORT.json into a temporary directory and compares it with the committed one byte for byte.
"""

from __future__ import annotations

import ast
import concurrent.futures
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from porter import __version__
from porter.errors import PorterError
from porter.layout import PORT_JSON, PortInfo, files_differing, port_files
from porter.source import transformers_tree
from packaging.version import Version

TARGETS = ("vllm", "aphrodite")
DRIFT_MD = "DRIFT.md"
DRIFT_JSON = "DRIFT.json"


# -- committed ports -----------------------------------------------------------------------------


def committed_ports(root: Path) -> dict[str, dict[str, PortInfo]]:
    """model_type -> target -> PortInfo of every port under ROOT/<target>/<model_type>/."""
    out: dict[str, dict[str, PortInfo]] = {}
    for target in TARGETS:
        tdir = Path(root) / target
        if not tdir.is_dir():
            continue
        for pdir in sorted(tdir.iterdir()):
            if (pdir / PORT_JSON).is_file():
                try:
                    info = PortInfo.load(pdir)
                except (OSError, ValueError, TypeError) as exc:
                    raise PorterError(f"unreadable {PORT_JSON}: {exc}", file=str(pdir)) from None
                out.setdefault(info.model_type, {})[target] = info
    if not out:
        raise PorterError("no committed ports (no <target>/<model_type>/PORT.json)", file=str(root))
    return out


def _convert(model_type: str, version: str, targets: list[str]):
    """Convert MODEL_TYPE from transformers VERSION for TARGETS: (source, [Converted])."""
    from porter.convert import analyse, convert_targets
    from porter.rules_data import get_target
    from porter.source import resolve

    tree = transformers_tree(version)
    source = resolve(model_type, transformers_dir=tree, transformers_version=version)
    idx, plan = analyse(source)
    return source, convert_targets(source, idx, plan, [get_target(t) for t in targets])


# -- check ---------------------------------------------------------------------------------------


@dataclass
class CheckResult:
    differing: list[str] = field(default_factory=list)  # paths (ROOT-relative paths joined to ROOT)
    errors: list[str] = field(default_factory=list)  # one line each
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.differing and not self.errors


def check(root: Path = Path("generated"), jobs: int | None = None) -> CheckResult:
    """Regenerate each committed port from its recorded transformers version into a temporary
    directory and compare it with ROOT byte for byte. A model's targets are converted together
    (one analysis, the shared rules once); models are spread over JOBS processes (default: up to
    two, one per core)."""
    root = Path(root)
    groups: dict[tuple[str, str], list[str]] = {}
    for model_type, by_target in sorted(committed_ports(root).items()):
        for target, info in sorted(by_target.items()):
            groups.setdefault((model_type, info.transformers_version), []).append(target)
    for version in sorted({v for _, v in groups}):
        try:
            transformers_tree(version)  # fetched once here, not by two workers at the same time
        except PorterError:
            pass  # reported for each of its ports below
    jobs = min(jobs or min(2, os.cpu_count() or 1), len(groups))
    res = CheckResult()
    with tempfile.TemporaryDirectory(prefix="porter-check-") as tmp:
        work = [(root, model_type, version, targets, Path(tmp)) for (model_type, version), targets in groups.items()]
        parts = []
        for rel in release_roots(root):  # the release ports join the same workers
            rel_work, rel_errors = _release_work(rel, Path(tmp) / rel.name)
            work += rel_work
            parts.append(rel_errors)
        if jobs == 1:
            parts += [_check_model(*w) for w in work]
            parts.append(_check_remote(root, Path(tmp)))
        else:
            with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
                remote = pool.submit(_check_remote, root, Path(tmp))
                parts += list(pool.map(_check_model, *zip(*work)))
                parts.append(remote.result())
    for part in parts:
        res.checked += part.checked
        res.differing += part.differing
        res.errors += part.errors
    return res


def release_roots(root: Path) -> list[Path]:
    """ROOT/releases/<version>/: the committed ports of an older transformers release, kept beside
    the installed release's ports of the same model types (issue 22). regen and coverage leave
    them alone (they stay ports of that release); `regen --check` converts them again from it."""
    rel = Path(root) / "releases"
    return sorted(p for p in rel.iterdir() if p.is_dir()) if rel.is_dir() else []


def _release_work(rel_root: Path, tmp: Path) -> tuple[list[tuple], CheckResult]:
    """The `_check_model` arguments of each committed port of a release root, and the errors of
    ports recorded as converted from another release."""
    work, res = [], CheckResult()
    for model_type, by_target in sorted(committed_ports(rel_root).items()):
        version = {info.transformers_version for info in by_target.values()}
        if version != {rel_root.name}:
            res.errors.append(f"{rel_root / model_type}: converted from transformers {sorted(version)}, "
                              f"not {rel_root.name}")
            continue
        work.append((rel_root, model_type, rel_root.name, sorted(by_target), tmp))
    return work, res


def _check_release(rel_root: Path, tmp: Path) -> CheckResult:
    """The committed ports of one release root, converted again in this process and compared."""
    work, res = _release_work(rel_root, tmp)
    for part in (_check_model(*w) for w in work):
        res.checked += part.checked
        res.differing += part.differing
        res.errors += part.errors
    return res


def _check_remote(root: Path, tmp: Path) -> CheckResult:
    """The committed ports of remote code (ROOT/remote/<target>/<model_type>/, issue 23), each
    converted again from the repository folder its PORT.json records and compared byte for byte
    (regen leaves them alone: their source is not in any transformers release)."""
    from porter.convert import analyse, convert_targets, write_port
    from porter.remote import recorded_folder
    from porter.rules_data import get_target
    from porter.source import resolve

    res = CheckResult()
    for pdir in sorted((root / "remote").glob(f"*/*/{PORT_JSON}")):
        pdir = pdir.parent
        res.checked += 1
        try:
            info = PortInfo.load(pdir)
            source = resolve(str(recorded_folder(info.remote)))
            idx, plan = analyse(source)
            (conv,) = convert_targets(source, idx, plan, [get_target(info.target)])
            new_dir = write_port(conv, tmp / "remote", force=True)
        except (PorterError, OSError, KeyError, ValueError) as exc:
            why = exc.one_line() if isinstance(exc, PorterError) else f"{type(exc).__name__}: {exc}"
            res.errors.append(f"{pdir}: {why}")
            continue
        res.differing += [str(pdir / rel) for rel in files_differing(port_files(pdir), port_files(new_dir))]
    return res


def _check_model(root: Path, model_type: str, version: str, targets: list[str], tmp: Path) -> CheckResult:
    from porter.convert import write_port

    res = CheckResult(checked=len(targets))
    try:
        _, convs = _convert(model_type, version, targets)
        new_dirs = [write_port(conv, tmp, force=True) for conv in convs]
    except PorterError as exc:
        res.errors += [f"{root / target / model_type}: {exc.one_line()}" for target in targets]
        return res
    for target, new_dir in zip(targets, new_dirs):
        old = port_files(root / target / model_type)
        res.differing += [str(root / target / model_type / rel) for rel in files_differing(old, port_files(new_dir))]
    return res


# -- regen and drift -----------------------------------------------------------------------------


def _signatures(text: str) -> dict[str, list[str]]:
    """scope -> parameter names of every function and method in a module's source."""
    out: dict[str, list[str]] = {}
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return out

    def params(fn) -> list[str]:
        a = fn.args
        names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
        if a.vararg:
            names.append("*" + a.vararg.arg)
        if a.kwarg:
            names.append("**" + a.kwarg.arg)
        return names

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = params(node)
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out[f"{node.name}.{sub.name}"] = params(sub)
    return out


def _scopes(text: str) -> dict[str, str]:
    """scope -> source text, with the scopes the provenance uses: "<module>", "Class",
    "Class.method", "function" (a class's text leaves out its methods; the module's, its defs)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return {"<module>": text}
    lines = text.splitlines(keepends=True)

    def seg(node) -> tuple[int, int]:
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        return start - 1, node.end_lineno

    out: dict[str, str] = {}
    module_keep = [True] * len(lines)
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        a, b = seg(node)
        module_keep[a:b] = [False] * (b - a)
        if isinstance(node, ast.ClassDef):
            keep = [True] * (b - a)
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    sa, sb = seg(sub)
                    out[f"{node.name}.{sub.name}"] = "".join(lines[sa:sb])
                    keep[sa - a: sb - a] = [False] * (sb - sa)
            out[node.name] = "".join(ln for ln, k in zip(lines[a:b], keep) if k)
        else:
            out[node.name] = "".join(lines[a:b])
    out["<module>"] = "".join(ln for ln, k in zip(lines, module_keep) if k)
    return out


def _port_module(files: dict[str, str]) -> str:
    for rel, text in files.items():
        if "/modeling_" in rel:
            return text
    return ""


def _rule_names() -> dict[str, str]:
    from porter.passes import PASSES

    return {r.code: r.name for r in PASSES}


def _target_drift(old_conv, old_files: dict[str, bytes], new_conv, names: dict[str, str]) -> dict:
    """What changed in one port: rules applied, per-scope provenance, per-scope code, files."""
    new_bytes = {rel: text.encode() for rel, text in new_conv.files.items()}
    new_bytes[PORT_JSON] = new_conv.info.to_json().encode()
    files_changed = sorted(rel for rel in set(old_files) | set(new_bytes)
                           if old_files.get(rel) != new_bytes.get(rel))
    d: dict = {"status": "converted", "files_changed": files_changed}
    if old_conv is None:
        d["rules_added"] = d["rules_removed"] = []
        d["scopes"] = {}
        d["rules_output_changed"] = []
        d["note"] = "the recorded version did not convert; no per-scope comparison"
        return d
    old_rules, new_rules = set(old_conv.rules_applied), set(new_conv.rules_applied)
    d["rules_added"] = sorted(new_rules - old_rules)
    d["rules_removed"] = sorted(old_rules - new_rules)
    old_code = _scopes(_port_module(old_conv.files))
    new_code = _scopes(_port_module(new_conv.files))
    scopes: dict[str, dict] = {}
    changed_codes: set[str] = set()
    for scope in sorted(set(old_conv.provenance) | set(new_conv.provenance) | set(old_code) | set(new_code)):
        op, np_ = set(old_conv.provenance.get(scope, [])), set(new_conv.provenance.get(scope, []))
        code_changed = old_code.get(scope) != new_code.get(scope)
        if op == np_ and not code_changed:
            continue
        entry = {"rules_added": sorted(np_ - op), "rules_removed": sorted(op - np_),
                 "port_code_changed": code_changed}
        if scope not in old_code and scope in new_code:
            entry["port_scope"] = "added"
        elif scope in old_code and scope not in new_code:
            entry["port_scope"] = "removed"
        scopes[scope] = entry
        changed_codes |= (op ^ np_)
        if code_changed:
            changed_codes |= (op | np_)
    d["scopes"] = scopes
    d["rules_output_changed"] = [f"{c} {names.get(c, '?')}" for c in sorted(changed_codes)]
    return d


def regen(
    version: str | None = None,
    *,
    root: Path = Path("generated"),
    out: Path | None = None,
    verify: bool = False,
    tps: tuple[int, ...] = (1, 2),
    force: bool = False,
    log=None,
    matrix: bool = True,
) -> dict:
    """Regenerate every committed port under ROOT from transformers VERSION (None: the version
    each port records) into OUT (default ROOT), write DRIFT.md / DRIFT.json there, return the
    drift as data. With MATRIX, DRIFT.md also gets the release matrix (porter/coverage/matrix.py):
    every committed model type converted from every release of rules/coverage.yaml."""
    root = Path(root)
    out = Path(out) if out is not None else root
    say = log or (lambda msg: None)
    ports = committed_ports(root)
    if version:
        transformers_tree(version)  # a release that cannot be fetched fails once, up front
    names = _rule_names()
    # a port converted from a release newer than VERSION (a day-zero port of a later release) is
    # not regenerated from an older one: it is listed as skipped, with the release it records
    skipped = {mt: _recorded(by_target) for mt, by_target in ports.items()
               if version and Version(_recorded(by_target)) > Version(version)}
    for model_type, recorded in sorted(skipped.items()):
        say(f"{model_type}: skipped (ported from transformers {recorded}, newer than {version})")
    todo = [(mt, by_target) for mt, by_target in sorted(ports.items()) if mt not in skipped]
    models, known = [], {}
    if verify:  # one engine at a time
        done = [_regen_model(mt, bt, version, root, out, names, force=force, tps=tps, say=say) for mt, bt in todo]
    else:  # conversions only: two processes (a conversion is one busy core)
        with concurrent.futures.ProcessPoolExecutor(min(2, os.cpu_count() or 1)) as pool:
            futures = [pool.submit(_regen_model_quiet, mt, bt, version, root, out, names, force) for mt, bt in todo]
            done = []
            for fut in futures:
                entry, cells, said = fut.result()
                for msg in said:
                    say(msg)
                done.append((entry, cells))
    for entry, cells in done:
        models.append(entry)
        known.update({(entry["model_type"], r): c for r, c in cells.items()})
    drift = {
        "porter_version": __version__,
        "transformers": version or "recorded",
        "models": models,
        "skipped": [{"model_type": mt, "transformers": v} for mt, v in sorted(skipped.items())],
        "failed": [m["model_type"] for m in models if m["error"]],
    }
    if matrix:
        from porter.coverage.matrix import release_matrix

        # (the cells this run already converted, the recorded release's and VERSION's, are reused)
        drift["matrix"] = release_matrix(sorted(ports), log=say, known=known)
    out.mkdir(parents=True, exist_ok=True)
    (out / DRIFT_JSON).write_text(json.dumps(drift, indent=2, sort_keys=True) + "\n")
    (out / DRIFT_MD).write_text(render_drift_md(drift))
    return drift


def _recorded(by_target: dict[str, PortInfo]) -> str:
    """The transformers release a model type's committed ports record (the first target's)."""
    return by_target[sorted(by_target, key=TARGETS.index)[0]].transformers_version


def _regen_model_quiet(model_type, by_target, version, root, out, names, force):
    """_regen_model in a worker process: (entry, release matrix cells, what it would have said)."""
    said: list[str] = []
    entry, cells = _regen_model(model_type, by_target, version, root, out, names, force=force, tps=None,
                                say=said.append)
    return entry, cells, said


def _regen_model(model_type: str, by_target: dict[str, PortInfo], version: str | None, root: Path,
                 out: Path, names: dict[str, str], *, force: bool, tps: tuple[int, ...] | None,
                 say) -> tuple[dict, dict[str, dict]]:
    """One model's drift entry: its targets converted from VERSION (or the recorded release)
    and written to OUT, compared with the port porter makes now from the recorded release;
    verified (vllm, at TPS) unless TPS is None. With it, the release matrix's cells of the
    releases converted here ({release: {"status": "converted"}}, the vllm target among them)."""
    from porter.convert import write_port

    targets = sorted(by_target, key=TARGETS.index)
    first = by_target[targets[0]]
    before_version = _recorded(by_target)
    after_version = version or before_version
    entry: dict = {
        "model_type": model_type,
        "source": first.source,
        "transformers": {"before": before_version, "after": after_version},
        "source_sha256": {"before": first.source_sha256, "after": None},
        "source_changed": None,
        "signatures_changed": {},
        "targets": {},
        "error": None,
    }
    say(f"{model_type}: transformers {before_version} -> {after_version}")
    # the port as porter makes it now from the recorded release (for per-scope provenance)
    old_source, old_convs = None, {}
    cells: dict[str, dict] = {}
    try:
        old_source, convs = _convert(model_type, before_version, targets)
        old_convs = {c.target: c for c in convs}
        if "vllm" in old_convs:
            cells[before_version] = {"status": "converted"}
    except PorterError as exc:
        entry["before_error"] = exc.one_line()
    try:
        if old_convs and after_version == before_version:
            new_source, new_list = old_source, [old_convs[t] for t in targets]
        else:
            new_source, new_list = _convert(model_type, after_version, targets)
    except PorterError as exc:
        entry["error"] = exc.one_line()
        for t in targets:
            entry["targets"][t] = {"status": "failed", "error": exc.one_line(), "verify": "not run"}
        say(f"{model_type}: FAILED: {exc.one_line()}")
        return entry, cells
    entry["source"] = new_source.rel_path
    entry["source_sha256"]["after"] = new_source.sha256
    entry["source_changed"] = new_source.sha256 != first.source_sha256
    if old_source is not None:
        entry["signatures_changed"] = _signature_changes(old_source.text, new_source.text)
    for conv in new_list:
        old_files = port_files(root / conv.target / model_type)
        td = _target_drift(old_convs.get(conv.target), old_files, conv, names)
        try:
            write_port(conv, out, force=force)
        except PorterError as exc:
            td["status"] = "failed"
            td["error"] = exc.one_line()
            entry["error"] = entry["error"] or exc.one_line()
        td["verify"] = "not run"
        entry["targets"][conv.target] = td
    if tps is not None and "vllm" in entry["targets"] and entry["targets"]["vllm"]["status"] == "converted":
        from porter.verify import run_verify

        say(f"{model_type}: verify vllm TP={','.join(map(str, tps))}")
        report = run_verify(out / "vllm" / model_type, list(tps))
        entry["targets"]["vllm"]["verify"] = {
            "exit_code": report.exit_code, "passed": report.passed, "reason": report.reason,
            "tps": list(tps),
        }
    say(f"{model_type}: converted ({', '.join(targets)})")
    if "vllm" in targets:
        cells[after_version] = {"status": "converted"}
    return entry, cells


def _signature_changes(old_text: str, new_text: str) -> dict[str, dict]:
    """scope -> the parameters removed and added between two versions of a module's source."""
    old_sig, new_sig = _signatures(old_text), _signatures(new_text)
    changed: dict[str, dict] = {}
    for scope in sorted(set(old_sig) | set(new_sig)):
        a, b = old_sig.get(scope), new_sig.get(scope)
        if a != b:
            changed[scope] = {
                "removed": [p for p in (a or []) if p not in (b or [])],
                "added": [p for p in (b or []) if p not in (a or [])],
                **({"scope": "added"} if a is None else {}),
                **({"scope": "removed"} if b is None else {}),
            }
    return changed


def render_drift_md(drift: dict) -> str:
    release = drift["transformers"]
    title = "the transformers versions the ports record" if release == "recorded" else f"transformers {release}"
    lines = [f"# Drift report: {title}", ""]
    lines.append(f"Generated by `porter regen` (porter {drift['porter_version']}). "
                 "Per model: the HF source before and after, forward signatures that changed, which "
                 "rules' outputs changed, which generated files changed, failures, verify.")
    lines.append("")
    lines.append("| model | transformers | source changed | vllm | aphrodite | verify (vllm) |")
    lines.append("|---|---|---|---|---|---|")
    for m in drift["models"]:
        t = m["targets"]

        def status(name: str) -> str:
            if name not in t:
                return "-"
            d = t[name]
            if d["status"] != "converted":
                return "FAILED"
            return f"{len(d['files_changed'])} file(s) changed" if d["files_changed"] else "unchanged"

        v = t.get("vllm", {}).get("verify", "not run")
        vtxt = v if isinstance(v, str) else ("pass" if v["passed"] else f"FAIL (exit {v['exit_code']})")
        changed = {None: "?", True: "yes", False: "no"}[m["source_changed"]]
        lines.append(f"| {m['model_type']} | {m['transformers']['before']} → {m['transformers']['after']} "
                     f"| {changed} | {status('vllm')} | {status('aphrodite')} | {vtxt} |")
    if drift.get("skipped"):
        lines.append("")
        lines.append(f"Not regenerated, ported from a release newer than {release}: "
                     + ", ".join(f"{s['model_type']} ({s['transformers']})" for s in drift["skipped"]) + ".")
    if drift.get("matrix"):
        from porter.coverage.matrix import render_matrix_md

        lines += ["", *render_matrix_md(drift["matrix"])]
    for m in drift["models"]:
        lines += ["", f"## {m['model_type']}", ""]
        lines.append(f"- source: `{m['source']}`")
        sha = m["source_sha256"]
        lines.append(f"- source sha256: `{sha['before']}` → `{sha['after'] or '-'}`")
        if m.get("before_error"):
            lines.append(f"- recorded version no longer converts: `{m['before_error']}`")
        if m["error"]:
            lines.append(f"- **failed**: `{m['error']}`")
        if m["signatures_changed"]:
            lines.append("- signatures changed in the HF source:")
            for scope, s in m["signatures_changed"].items():
                if s.get("scope"):
                    lines.append(f"  - `{scope}`: {s['scope']}")
                    continue
                parts = [f"-{p}" for p in s["removed"]] + [f"+{p}" for p in s["added"]]
                lines.append(f"  - `{scope}`: {' '.join(parts) or 'parameter order'}")
        for name, d in m["targets"].items():
            if d["status"] != "converted":
                lines.append(f"- {name}: **failed**: `{d.get('error')}`")
                continue
            lines.append(f"- {name}: files changed: "
                         + (", ".join(f"`{f}`" for f in d["files_changed"]) or "none"))
            if d["rules_added"] or d["rules_removed"]:
                lines.append(f"  - rules applied: added {d['rules_added'] or '-'}, "
                             f"removed {d['rules_removed'] or '-'}")
            if d["rules_output_changed"]:
                lines.append(f"  - rules whose output changed: {', '.join(d['rules_output_changed'])}")
            for scope, s in d["scopes"].items():
                bits = []
                if s.get("port_scope"):
                    bits.append(f"scope {s['port_scope']}")
                elif s["port_code_changed"]:
                    bits.append("port code changed")
                if s["rules_added"]:
                    bits.append(f"rules +{','.join(s['rules_added'])}")
                if s["rules_removed"]:
                    bits.append(f"rules -{','.join(s['rules_removed'])}")
                lines.append(f"  - `{scope}`: {'; '.join(bits)}")
            v = d.get("verify", "not run")
            if not isinstance(v, str):
                v = "pass" if v["passed"] else f"FAIL (exit {v['exit_code']}): {v['reason']}"
            lines.append(f"  - verify: {v}")
    return "\n".join(lines) + "\n"
