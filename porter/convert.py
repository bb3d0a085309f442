"""Convert: index -> plan -> rewrite passes -> templates -> an atomically written port directory."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import libcst as cst

from porter import __version__
from porter.analysis.config_properties import missing_properties
from porter.analysis.config_source import attribute_aliases
from porter.analysis.index import ModelIndex, build_index, parse
from porter.errors import PorterError
from porter.layout import PORT_JSON, PortInfo, package_name
from porter.passes import REGISTRY, RewriteContext
from porter.passes.base import SharedTarget, SourceContext
from porter.passes.pipeline import BEFORE_INDEX, MODEL, run
from porter.plan import PortPlan, build_plan
from porter.render import render
from porter.rules_data import Target, get_target, strip_table
from porter.config_port import ship_config
from porter.remote import recorded
from porter.source import Source, resolve, transformers_root, transformers_tree
from porter.undefined import check_defined


@dataclass
class Converted:
    target: str
    plan: PortPlan
    files: dict[str, str]  # relpath -> text
    rules_applied: list[str]
    provenance: dict[str, list[str]]
    info: PortInfo

    def port_files(self) -> dict[str, bytes]:
        """The port directory write_port writes (relpath -> bytes), PORT.json included."""
        return {**{rel: text.encode() for rel, text in self.files.items()}, PORT_JSON: self.info.to_json().encode()}


@contextlib.contextmanager
def _collector_paused():
    """Converting allocates a few hundred thousand short-lived libcst nodes, freed by reference
    counting; the cyclic collector's sweeps over them were a third of convert's time. Paused for
    one conversion (nested calls keep it paused), back on after."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def analyse(source: Source) -> tuple[ModelIndex, PortPlan]:
    with _collector_paused():
        return _analyse(source)


def _analyse(source: Source) -> tuple[ModelIndex, PortPlan]:
    module = parse(source.text, str(source.path))
    pre = SourceContext(source.text)
    module = run(BEFORE_INDEX, module, pre, path=str(source.path))
    idx = build_index(module, str(source.path), source.text, renamed=pre.renamed)
    idx.provenance = pre.provenance  # the rules that ran before indexing, for `porter diff`
    idx.trained_length = pre.trained_length  # what PT300 showed exact within a trained length (PT297 guards it)
    # what the source release's config classes compute that the engine's lack (PT340 writes it)
    idx.config_properties = missing_properties(source.config_path, source.rel_path, transformers_root())
    idx.config_aliases = attribute_aliases(source.config_path)  # the config's names for one field
    # the plan, finished (checkpoint names, architecture) and sealed: the passes only read it
    plan = build_plan(idx, strip_table(), source.model_type, source.rel_path, origin=source)
    return idx, plan


def rewrite_targets(idx: ModelIndex, plan: PortPlan,
                    targets: list[Target]) -> list[tuple[str, RewriteContext, list[str]]]:
    """The rewrite passes for each target: (code, context, rules applied) per target. The rules
    before the first that reads the target run once for all of them (targets differ only in
    names and import paths, so this is most of a second target's time)."""
    ctx = RewriteContext(idx=idx, plan=plan, table=plan.strip, target=SharedTarget(targets))  # type: ignore[arg-type]
    for scope, codes in idx.provenance.items():
        ctx.provenance.setdefault(scope, set()).update(codes)
    ctx.trained_length.update(idx.trained_length)
    ctx.config_properties.update(idx.config_properties)
    ctx.config_aliases.update(idx.config_aliases)
    before = sorted({c for codes in idx.provenance.values() for c in codes})
    applied = [f"{c} {REGISTRY[c].name}" for c in before]  # the rules that ran before indexing
    split = next((i for i, r in enumerate(MODEL) if r.reads_target), len(MODEL))
    module = run(MODEL[:split], idx.module, ctx, applied, path=idx.path)
    out = []
    for target in targets:
        own = ctx.fork(target)
        own_applied = list(applied)
        out.append((run(MODEL[split:], module, own, own_applied, path=idx.path).code, own, own_applied))
    return out


def ruff_format(text: str) -> str:
    # the ruff binary beside this interpreter: no second Python start-up per file
    exe = Path(sys.executable).with_name("ruff")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "ruff"]
    proc = subprocess.run(
        [*cmd, "format", "--line-length", "100", "-"],
        input=text, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise PorterError(f"generated code does not format: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout


def convert_one(source: Source, idx: ModelIndex, plan: PortPlan, target: Target) -> Converted:
    return convert_targets(source, idx, plan, [target])[0]


def convert_targets(source: Source, idx: ModelIndex, plan: PortPlan, targets: list[Target]) -> list[Converted]:
    """One port per target, from one analysis (the shared rewrite passes run once)."""
    with _collector_paused():
        return [_package(source, plan, target, *rewritten)
                for target, rewritten in zip(targets, rewrite_targets(idx, plan, targets))]


def _package(source: Source, plan: PortPlan, target: Target, body: str, ctx: RewriteContext,
             applied: list[str]) -> Converted:
    pkg = package_name(target.name, source.model_type)
    module_name = f"modeling_{source.model_type}"
    meta = dict(
        porter_version=__version__, target=target.name, transformers_version=source.transformers_version,
        source=source.rel_path, source_sha256=source.sha256, rules=[a.split()[0] for a in applied],
        hf_architecture=plan.causal_lm, architecture=plan.architecture, package=pkg,
        module=f"{pkg}.{module_name}", class_name=plan.causal_lm, plugin_group=target.plugin_group,
        registry_module=target.package, config_class="", config_model_type="",
        # an attention-free state-space model: the engine sets up its state cache (mamba_block_size) by a
        # table keyed by architecture, which names only its own ports
        arch_config=target.symbols["MambaModelConfig"] if plan.ssm and not plan.attentions else "",
    )
    port_text = ruff_format(render("header.py.j2", **meta) + "\n" + body)
    check_defined(port_text, source.text, str(source.path))
    shipped = ship_config(source, plan.causal_lm, transformers_root())
    files = {f"{pkg}/{module_name}.py": port_text}
    if shipped is not None:
        files[f"{pkg}/{shipped.module_name}.py"] = ruff_format(shipped.text)
        meta.update(config_class=f"{pkg}.{shipped.module_name}:{shipped.class_name}",
                    config_model_type=shipped.model_type)
    files[f"{pkg}/__init__.py"] = ruff_format(render("register.py.j2", **meta))
    files["pyproject.toml"] = render("pyproject.toml.j2", **meta)
    info = PortInfo(
        target=target.name, model_type=source.model_type, architecture=plan.architecture,
        hf_architecture=plan.causal_lm, package=pkg, module=f"{pkg}.{module_name}",
        plugin_group=target.plugin_group, source=source.rel_path,
        transformers_version=source.transformers_version, source_sha256=source.sha256,
        porter_version=__version__,
        files={k: hashlib.sha256(v.encode()).hexdigest() for k, v in sorted(files.items())},
        rules_applied=applied, plan=plan.to_dict(),
        config_class=meta.get("config_class", ""), config_model_type=meta.get("config_model_type", ""),
        remote=recorded(source.path.parent) if source.remote else {},
    )
    prov = {k: sorted(v) for k, v in sorted(ctx.provenance.items())}
    return Converted(target.name, plan, files, applied, prov, info)


# made by using a port, not by editing it: never counted as a hand edit
_USE_ARTIFACTS = ("__pycache__", ".pyc", ".egg-info")


def edited_files(port_dir: Path) -> list[str]:
    """Files of an existing port that differ from the hashes in its PORT.json, are missing, or
    were added beside them (hand edits: overwriting the port would lose them)."""
    try:
        info = PortInfo.load(port_dir)
        listed = dict(info.files)
    except (OSError, ValueError, TypeError, AttributeError):
        return [PORT_JSON]
    out = []
    for rel, digest in listed.items():
        p = port_dir / rel
        try:
            same = p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() == digest
        except OSError:
            same = False
        if not same:
            out.append(rel)
    for p in sorted(port_dir.rglob("*")):
        rel = p.relative_to(port_dir).as_posix()
        if p.is_dir() or rel == PORT_JSON or rel in listed:
            continue
        if any(part.endswith(_USE_ARTIFACTS) for part in p.relative_to(port_dir).parts):
            continue
        out.append(rel)
    return out


def check_dest(dest: Path, force: bool = False) -> None:
    """Refuse (one line) to replace a port that was edited by hand, unless ``force``."""
    if not dest.exists() or force:
        return
    if not dest.is_dir():
        raise PorterError("output path exists and is not a directory", file=str(dest))
    edited = edited_files(dest)
    if edited:
        raise PorterError(
            f"port was edited by hand ({', '.join(edited)}); use --force to overwrite",
            file=str(dest),
        )


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def write_port(conv: Converted, out_root: Path, force: bool = False) -> Path:
    """Write the port directory as a whole: build it beside the old one, then swap the two in
    one atomic rename (a kill at any moment leaves the old tree or the new one, never a mix;
    at worst a hidden ``.<name>.new-*`` directory beside it)."""
    dest = out_root / conv.target / conv.info.model_type
    check_dest(dest, force)
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.new-", dir=parent))
    except OSError as exc:
        raise PorterError(f"cannot write output: {exc.strerror}", file=str(parent)) from None
    try:
        for rel, text in sorted(conv.files.items()):
            p = tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
        (tmp / PORT_JSON).write_text(conv.info.to_json())
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a port is an ordinary directory
        if dest.is_dir() and not dest.is_symlink() and _exchange(tmp, dest):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old tree
        else:
            old = None
            if dest.exists() or dest.is_symlink():
                old = parent / f".{dest.name}.old-{os.getpid()}"
                os.rename(dest, old)
            os.rename(tmp, dest)
            if old is not None:
                if old.is_dir() and not old.is_symlink():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink()
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PorterError(f"cannot write output: {exc.strerror}", file=str(dest)) from None
    return dest


def resolve_release(src: str, *, config: str | None = None, transformers: str | None = None) -> Source:
    """SRC in the installed transformers, or (``transformers="5.24.0"``) in that release's wheel,
    read statically: the release need not be installable next to the engine."""
    if not transformers:
        return resolve(src, config=config)
    tree = transformers_tree(transformers)
    return resolve(src, config=config, transformers_dir=tree, transformers_version=transformers)


def convert(src: str, targets: list[str], out: Path, *, config: str | None = None,
            force: bool = False, write: bool = True, transformers: str | None = None) -> list[Converted]:
    tgts = [get_target(t) for t in targets]
    source = resolve_release(src, config=config, transformers=transformers)
    idx, plan = analyse(source)
    results = convert_targets(source, idx, plan, tgts)  # all succeed before anything is written
    if write:
        for conv in results:  # every port may be replaced before any is written
            check_dest(out / conv.target / conv.info.model_type, force)
        for conv in results:
            write_port(conv, out, force=force)
    return results


def plan_json(src: str, config: str | None = None) -> str:
    source = resolve(src, config=config)
    _, plan = analyse(source)
    return json.dumps(plan.to_dict(), indent=2)


__all__ = ["convert", "convert_one", "convert_targets", "plan_json", "Converted", "cst"]
