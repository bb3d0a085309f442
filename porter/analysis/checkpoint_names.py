"""Checkpoint names that differ from the module tree, read statically from transformers.

transformers 5 renames some checkpoint keys when loading (`conversion_mapping.py`:
`WeightRenaming(source_patterns=r"^embed_out\\.", target_patterns="lm_head.")` for GPT-NeoX), and
writes the old names back when saving. The port's modules carry the in-memory names, so its
`load_weights` applies the same renamings. Only plain renamings are read; the file is parsed,
never imported.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from porter.analysis.filecache import derived


_Tables = tuple[tuple[tuple[ast.AST | None, ast.AST], ...], tuple[ast.stmt, ...]]


def _derive_tables(tree: ast.Module) -> _Tables:
    pairs = tuple(pair for node in ast.walk(tree) if isinstance(node, ast.Dict)
                  for pair in zip(node.keys, node.values))
    stmts = tuple(sorted((n for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AugAssign)) or _appends(n)),
                         key=lambda n: (n.lineno, n.col_offset)))
    return pairs, stmts


def _appends(node: ast.AST) -> bool:
    """`table["key"].append(call)` / `.extend([...])` as a statement."""
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) \
        and isinstance(node.value.func, ast.Attribute) and node.value.func.attr in ("append", "extend") \
        and _subscript_key(node.value.func.value) is not None


def _tables(path: Path) -> _Tables:
    """transformers' conversion mapping, read statically: (key, value) of every dict literal in
    file order, and its assignments in source order. Parsed once per process and version of the
    file (it is transformers' data, not the file being ported; the nodes are only read)."""
    return derived(path, _derive_tables, ((), ()))


def weight_renamings(transformers_dir: Path | None, keys: list[str]) -> list[tuple[str, str]]:
    """(source regex, target) pairs registered under any of `keys` (model_type, class name)."""
    if transformers_dir is None:
        return []
    pairs, _ = _tables(transformers_dir / "conversion_mapping.py")
    out: list[tuple[str, str]] = []
    for key, value in pairs:
        if not (isinstance(key, ast.Constant) and key.value in keys and isinstance(value, ast.List)):
            continue
        out += [r for call in value.elts if (r := _renaming(call)) is not None]
    if not out:
        # an entry the table builder makes after the literal (`mapping["flint"] =
        # mapping["qwen2_moe"].copy()`, then `+= [WeightRenaming(...)]`), or its base pattern's
        out = [r for call in _conversion_entries(transformers_dir, keys) if (r := _renaming(call)) is not None]
    if not out:
        # a model type without an entry of its own uses its base pattern's (granitemoeshared ->
        # granitemoe in _MODEL_TO_CONVERSION_PATTERN), as transformers does
        aliases = {}
        for key, value in pairs:
            if isinstance(key, ast.Constant) and isinstance(value, ast.Constant) \
                    and isinstance(value.value, str) and key.value in keys:
                aliases.setdefault(key.value, value.value)
        base = [aliases[k] for k in keys if k in aliases]
        if base and base[0] not in keys:
            return weight_renamings(transformers_dir, base[:1])
    return out


def _renaming(call: ast.AST) -> tuple[str, str] | None:
    """`WeightRenaming("src", "dst")` (or by keyword) -> (src, dst)."""
    if not (isinstance(call, ast.Call) and getattr(call.func, "id", None) == "WeightRenaming"):
        return None
    kw = {k.arg: k.value for k in call.keywords}
    args = list(call.args) + [kw.get("source_patterns"), kw.get("target_patterns")][len(call.args):]
    src, dst = (args + [None, None])[:2]
    if isinstance(src, ast.Constant) and isinstance(dst, ast.Constant) \
            and isinstance(src.value, str) and isinstance(dst.value, str):
        return src.value, dst.value
    return None


def _conversion_entries(transformers_dir: Path | None, keys: list[str]) -> list[ast.Call]:
    """The calls (WeightRenaming / WeightConverter) registered for the first of `keys` that has
    an entry, following `_MODEL_TO_CONVERSION_PATTERN` (qwen3_moe -> qwen2_moe) as transformers
    does when a model type has no entry of its own."""
    if transformers_dir is None:
        return []
    pairs, stmts = _tables(transformers_dir / "conversion_mapping.py")
    entries: dict[str, list[ast.Call]] = {}
    aliases: dict[str, str] = {}
    for key, value in pairs:
        if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
            continue
        if isinstance(value, ast.List):
            entries.setdefault(key.value, [c for c in value.elts if isinstance(c, ast.Call)])
        elif isinstance(value, ast.Constant) and isinstance(value.value, str):
            aliases.setdefault(key.value, value.value)
    # then, in source order, what the table builder does to it after the literal:
    # `mapping["flint"] = mapping["qwen2_moe"].copy()`, `mapping["flint"] += [WeightRenaming(...)]`
    for node in stmts:
        if isinstance(node, ast.Expr):  # `table["key"].append(WeightRenaming(...))`, `.extend([...])`
            call, key = node.value, _subscript_key(node.value.func.value)
            added = call.args[0] if len(call.args) == 1 else None
            items = [added] if call.func.attr == "append" else \
                (added.elts if isinstance(added, ast.List) else [])
            if key in entries:
                entries[key] = entries[key] + [c for c in items if isinstance(c, ast.Call)]
            continue
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
            getattr(node, "target", None)
        key = _subscript_key(target)
        if key is None:
            continue
        calls = _entry_value(node.value, entries)
        if calls is None:
            continue
        if isinstance(node, ast.AugAssign):
            if isinstance(node.op, ast.Add):
                entries[key] = entries.get(key, []) + calls
        else:
            entries[key] = calls
    for k in keys:
        if k in entries:
            return entries[k]
    for k in keys:
        if k in aliases and aliases[k] in entries:
            return entries[aliases[k]]
    return []


def _subscript_key(node: ast.AST | None) -> str | None:
    """`table["key"]` -> "key"."""
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) \
            and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
        return node.slice.value
    return None


def _entry_value(node: ast.AST, entries: dict[str, list[ast.Call]]) -> list[ast.Call] | None:
    """The calls a table entry gets: a list literal, or another entry (`table["y"]`, `.copy()`)."""
    if isinstance(node, ast.List):
        return [c for c in node.elts if isinstance(c, ast.Call)]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "copy" \
            and not node.args:
        node = node.func.value
    key = _subscript_key(node)
    return list(entries[key]) if key is not None and key in entries else None


def _strings(node: ast.AST | None) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [s for e in node.elts for s in _strings(e)]
    return []


def expert_checkpoint_names(transformers_dir: Path | None, keys: list[str], gate_up: str,
                            down: str) -> tuple[str, str, str] | None:
    """(gate, down, up) names of one expert's projections in the checkpoint, from the
    `WeightConverter`s that merge per-expert tensors (`experts.*.w1.weight`, `experts.*.w3.weight`
    -> `experts.gate_up_proj`, concatenated in that order) into the in-memory 3-D parameters.
    None when the checkpoint keeps the experts packed (no such converter)."""
    found: dict[str, list[str]] = {}
    for call in _conversion_entries(transformers_dir, keys):
        if getattr(call.func, "id", None) != "WeightConverter":
            continue
        kw = {k.arg: k.value for k in call.keywords}
        ops = kw.get("operations")
        if not (isinstance(ops, ast.List) and any(
                isinstance(o, ast.Call) and getattr(o.func, "id", None) == "MergeModulelist" for o in ops.elts)):
            continue
        targets = _strings(kw.get("target_patterns"))
        sources = _strings(kw.get("source_patterns"))
        names = []
        for s in sources:  # ".experts.*.w1.weight" -> "w1"
            parts = s.split("*", 1)
            if len(parts) != 2:
                break
            names.append(parts[1].strip(".").removesuffix(".weight").strip("."))
        for t in targets:
            tail = t.rstrip("$").split(".")[-1]
            if tail in (gate_up, down) and len(names) == len(sources):
                found[tail] = names
    if len(found.get(gate_up, [])) != 2 or len(found.get(down, [])) != 1:
        return None
    return found[gate_up][0], found[down][0], found[gate_up][1]


_SEGMENT = re.compile(r"^\\?\.([A-Za-z_][A-Za-z0-9_]*)\\?\.$")


def module_renamings(renames: list[tuple[str, str]]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Split renamings into module attribute renames (`.block_sparse_moe.` -> `.mlp.`: an inner
    module saved under another name) and the rest. Returns ({in-memory attr: checkpoint attr},
    remaining renamings)."""
    attrs: dict[str, str] = {}
    rest: list[tuple[str, str]] = []
    for src, dst in renames:
        a, b = _SEGMENT.match(src), _SEGMENT.match(dst)
        if a and b:
            attrs[b.group(1)] = a.group(1)
        else:
            rest.append((src, dst))
    # a renaming of one tensor that only repeats a module rename (minimax_m2's
    # `.block_sparse_moe.e_score_correction_bias` -> `.mlp.e_score_correction_bias`): the port keeps
    # the checkpoint's module name, so the tensor needs no renaming
    rest = [(src, dst) for src, dst in rest
            if not any(src.replace(f".{ckpt}.", f".{mem}.") == dst for mem, ckpt in attrs.items())]
    # transformers applies the renamings one after another, so a later one may name a module by
    # the name an earlier one gave it (sarvam_moe: `.attention.` -> `.self_attn.`, then
    # `.self_attn.dense.` -> `.self_attn.o_proj.`); the port keeps the checkpoint's module name,
    # so such a renaming is read in checkpoint terms (`.attention.dense.` -> `.attention.o_proj.`)
    for mem, ckpt in attrs.items():
        rest = [(src.replace(rf"\.{mem}\.", rf"\.{ckpt}\."), dst.replace(f".{mem}.", f".{ckpt}."))
                for src, dst in rest]
    return attrs, rest


def split_qkv_renamings(transformers_dir: Path | None, keys: list[str], q: str, k: str, v: str,
                        packed: str) -> list[tuple[str, str]]:
    """A checkpoint that stores q, k and v as one tensor which transformers splits when loading
    (`WeightConverter(source_patterns="query_key_value", target_patterns=["q_proj", "k_proj",
    "v_proj"], operations=[Split(dim=0)])`: rows in that order, each as many as its target has):
    the engine's packed q/k/v projection loads exactly that tensor as a whole (its loader splits it
    by the q, k and v sizes), so the tensor is renamed to it. Only this exact form is read."""
    out: list[tuple[str, str]] = []
    for call in _conversion_entries(transformers_dir, keys):
        if getattr(call.func, "id", None) != "WeightConverter":
            continue
        kw = {a.arg: a.value for a in call.keywords}
        ops = kw.get("operations")
        sources, targets = _strings(kw.get("source_patterns")), _strings(kw.get("target_patterns"))
        if not (isinstance(ops, ast.List) and len(ops.elts) == 1 and isinstance(op := ops.elts[0], ast.Call)
                and getattr(op.func, "id", None) == "Split" and _split_dim(op) == 0):
            continue
        if targets == [q, k, v] and len(sources) == 1 and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", sources[0]):
            out.append((rf"\.{sources[0]}\.", f".{packed}."))
    return out


def _split_dim(op: ast.Call) -> int | None:
    dims = [a for a in op.args] + [k.value for k in op.keywords if k.arg == "dim"]
    if not dims:
        return 0
    return dims[0].value if len(dims) == 1 and isinstance(dims[0], ast.Constant) else None


def mapping_digest_text(transformers_dir: Path, model_type: str, text: str) -> str:
    """What the readers above can take from the conversion mapping for a model whose files are
    TEXT: every entry whose key is MODEL_TYPE or occurs in TEXT (a class name, a text model type),
    the entries they alias, each as the readers resolve it. Two releases whose mapping differs only
    elsewhere give the same text (the release matrix converts such a model once)."""
    pairs, _ = _tables(transformers_dir / "conversion_mapping.py")
    strings = {k.value for k, _ in pairs if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    keys = {k for k in strings if k == model_type or k in text}
    for key, value in pairs:  # the base pattern an entry names (qwen3_moe -> qwen2_moe)
        if isinstance(key, ast.Constant) and key.value in keys and isinstance(value, ast.Constant) \
                and isinstance(value.value, str):
            keys.add(value.value)
    out = [ast.dump(k) + ast.dump(v) for k, v in pairs if isinstance(k, ast.Constant) and k.value in keys]
    out += [k + ":" + ",".join(ast.dump(c) for c in _conversion_entries(transformers_dir, [k])) for k in sorted(keys)]
    return "\n".join(out)
