"""Phase 1 — index: parse the HF file once, resolve metadata once, describe what is there.

The index is plain data: classes, their sub-modules (what `self.x = ...` builds in __init__),
their linears and embeddings, module-level functions, and import bindings. Positions come from
one `MetadataWrapper` resolve, shared by everything after (errors point at file:line).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ast

import libcst as cst
import libcst.matchers as m
from libcst.metadata import MetadataWrapper, PositionProvider

from porter.analysis.cstutil import dotted, find_method, findall, self_attr, statements
from porter.errors import PorterError

LINEAR_NAMES = {"torch.nn.Linear"}
# forward() parameters the HF cache object travels in (those of rules/hf_strip.yaml's strip_params)
CACHE_PARAMS = frozenset({"past_key_values", "past_key_value", "cache", "layer_past"})
EMBEDDING_NAMES = {"torch.nn.Embedding"}
MODULE_LIST_NAMES = {"torch.nn.ModuleList"}
LAYER_NORM_NAMES = {"torch.nn.LayerNorm"}


@dataclass
class Submodule:
    attr: str
    ctor: str  # resolved constructor name: a class of this file, or a qualified name
    call: cst.Call
    line: int
    in_list: bool = False  # built inside nn.ModuleList([... for ...])


@dataclass
class ClassInfo:
    name: str
    node: cst.ClassDef
    line: int
    bases: list[str]
    submodules: dict[str, Submodule] = field(default_factory=dict)

    def method(self, name: str) -> cst.FunctionDef | None:
        return find_method(self.node, name)

    def linears(self) -> dict[str, Submodule]:
        return {a: s for a, s in self.submodules.items() if s.ctor in LINEAR_NAMES or is_transposed_linear(s.ctor)}


def is_transposed_linear(name: str | None) -> bool:
    """A linear in the transposed convention (transformers' Conv1D: weight [in, out]); the table
    in rules/hf_strip.yaml lists them by the end of their qualified name."""
    from porter.rules_data import strip_table

    return bool(name) and any(name == t or name.endswith("." + t) or name == t.rsplit(".", 1)[-1]
                              for t in strip_table().transposed_linears)


@dataclass
class ModelIndex:
    path: str
    module: cst.Module
    imports: dict[str, str]  # local name -> qualified ("...activations.ACT2FN" when relative)
    classes: dict[str, ClassInfo]
    functions: dict[str, cst.FunctionDef]
    lines: dict[int, int]  # id(node) -> line, filled from one position resolve when first asked
    # every identifier in the file (names, attribute names, keywords), from Python's parser: lets a
    # rule that can only act on some name skip its walk when the file never mentions it
    identifiers: frozenset[str] = frozenset()
    provenance: dict[str, set[str]] = field(default_factory=dict)  # scope -> rules run before indexing (PT150, PT152)
    trained_length: dict[str, list[str]] = field(default_factory=dict)  # PT300's record, for PT297
    config_properties: dict = field(default_factory=dict)  # config_properties.missing_properties, for PT340
    config_aliases: dict[str, str] = field(default_factory=dict)  # config_source.attribute_aliases

    def qualify(self, name: str | None) -> str | None:
        """Resolve a dotted local name through the file's imports (`nn.Linear` -> torch.nn.Linear)."""
        if name is None:
            return None
        head, _, rest = name.partition(".")
        if head in self.imports:
            q = self.imports[head]
            return f"{q}.{rest}" if rest else q
        return name

    def line_of(self, node: cst.CSTNode) -> int | None:
        # Positions cost more than the rest of the index: resolved once, and only when an error
        # (or a caller) needs a line; the lines recorded in the plan come from Python's own parser.
        if not self.lines:
            positions = MetadataWrapper(self.module, unsafe_skip_copy=True).resolve(PositionProvider)
            self.lines.update({id(n): r.start.line for n, r in positions.items()})
        return self.lines.get(id(node))

    def error(self, message: str, node: cst.CSTNode | None = None, **kw) -> PorterError:
        return PorterError(message, file=self.path, line=self.line_of(node) if node else None, **kw)


def parse(text: str, path: str) -> cst.Module:
    try:
        return cst.parse_module(text)
    except cst.ParserSyntaxError as exc:
        first = str(exc.message).splitlines()[0] if exc.message else "invalid syntax"
        raise PorterError(f"syntax error: {first}", file=path, line=exc.raw_line) from None
    except RecursionError:
        raise PorterError("source nests too deeply to parse", file=path) from None


class _Indexer:
    """Imports, top-level classes and functions: a walk over statements only (no expression
    holds a statement), reading nodes' fields instead of a libcst visit that rebuilds them."""

    def __init__(self, ast_lines: dict[str, int]) -> None:
        self.ast_lines = ast_lines
        self.imports: dict[str, str] = {}
        self.classes: dict[str, ClassInfo] = {}
        self.functions: dict[str, cst.FunctionDef] = {}
        self.lines: dict[int, int] = {}

    def run(self, module: cst.Module) -> None:
        for node, nested in statements(module):
            kind = type(node)
            if kind is cst.Import:
                self._import(node)
            elif kind is cst.ImportFrom:
                self._import_from(node)
            elif kind is cst.ClassDef and not nested:
                bases = [dotted(b.value) or "" for b in node.bases]
                self.classes[node.name.value] = ClassInfo(
                    name=node.name.value, node=node,
                    line=self.ast_lines.get(f"class {node.name.value}", 0), bases=bases,
                )
            elif kind is cst.FunctionDef and not nested:
                self.functions[node.name.value] = node

    def _import(self, node: cst.Import) -> None:
        for alias in node.names:
            full = dotted(alias.name) or ""
            local = alias.asname.name.value if alias.asname else full.split(".")[0]
            self.imports[local] = full if alias.asname else local

    def _import_from(self, node: cst.ImportFrom) -> None:
        if isinstance(node.names, cst.ImportStar):
            return
        mod = "." * len(node.relative) + (dotted(node.module) or "")
        for alias in node.names:
            name = dotted(alias.name) or ""
            local = alias.asname.name.value if alias.asname else name  # type: ignore[union-attr]
            sep = "" if mod.endswith(".") else "."
            self.imports[local] = f"{mod}{sep}{name}"


def _ast_facts(text: str) -> tuple[dict[str, int], frozenset[str]]:
    """Lines of top-level classes and of `self.x = ...` in their __init__, and every identifier of
    the file, from Python's parser."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError):
        return {}, frozenset()
    idents = frozenset(
        n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute) else n.arg
        for n in ast.walk(tree) if isinstance(n, (ast.Name, ast.Attribute, ast.keyword)) and
        (n.arg if isinstance(n, ast.keyword) else True)
    )
    return _ast_lines(tree), idents


def _ast_lines(tree: ast.Module) -> dict[str, int]:
    out: dict[str, int] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        out[f"class {node.name}"] = node.lineno
        for item in node.body:
            if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                for st in ast.walk(item):
                    if isinstance(st, ast.Assign) and len(st.targets) == 1:
                        t = st.targets[0]
                        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                            out.setdefault(f"{node.name}.{t.attr}", st.lineno)
    return out


def build_index(module: cst.Module, path: str, text: str | None = None,
                renamed: dict[str, str] | None = None) -> ModelIndex:
    """`renamed`: classes a rule before indexing renamed (new name -> the source's), so their lines
    are still read from the source text."""
    ast_lines, identifiers = _ast_facts(module.code if text is None else text)
    for new, old in (renamed or {}).items():
        ast_lines.update({new + key[len(old):] if not key.startswith("class ") else f"class {new}": line
                          for key, line in list(ast_lines.items())
                          if key == f"class {old}" or key.startswith(f"{old}.")})
    indexer = _Indexer(ast_lines)
    indexer.run(module)
    idx = ModelIndex(
        path=path,
        module=module,
        imports=_normalise_imports(indexer.imports),
        classes=indexer.classes,
        functions=indexer.functions,
        lines=indexer.lines,
        identifiers=identifiers,
    )
    for info in idx.classes.values():
        _collect_submodules(idx, info)
        for attr, sub in info.submodules.items():
            sub.line = ast_lines.get(f"{info.name}.{attr}", info.line)
    return idx


def _normalise_imports(imports: dict[str, str]) -> dict[str, str]:
    # `from torch import nn` -> nn = torch.nn; plain `import torch` -> torch.
    return dict(imports)


def _collect_submodules(idx: ModelIndex, info: ClassInfo) -> None:
    init = info.method("__init__")
    if init is None:
        return

    for node in findall(init, m.Assign() | m.AnnAssign(value=m.DoesNotMatch(None))):
        # `self.transformer: MPTModel = MPTModel(config)` builds a submodule as a plain assignment does
        targets = [node.target] if isinstance(node, cst.AnnAssign) else [t.target for t in node.targets]
        if len(targets) != 1:
            continue
        attr = self_attr(targets[0])
        if attr is None:
            continue
        value = node.value
        in_list = False
        if isinstance(value, cst.Call) and idx.qualify(dotted(value.func)) in MODULE_LIST_NAMES:
            inner = value.args[0].value if value.args else None
            if isinstance(inner, cst.ListComp) and isinstance(inner.elt, cst.Call):
                value, in_list = inner.elt, True
            elif isinstance(inner, cst.Name) and (built := appended_module(init, inner.value)) is not None:
                value, in_list = built, True  # `layers.append(Layer(...))` in a loop, then nn.ModuleList(layers)
        if isinstance(value, cst.IfExp) and isinstance(value.body, cst.Call) and m.matches(value.orelse, m.Name("None")):
            value = value.body  # `Module(config) if config.n > 0 else None`: built when the config asks
        if not isinstance(value, cst.Call):
            continue
        name = dotted(value.func) or table_class(idx, value.func)
        if isinstance(value.func, cst.Name) and (aliased := table_alias(idx, init, value.func.value)) is not None:
            name = aliased  # `attention_class = X_ATTENTION_CLASSES[...]`, then `attention_class(config)`
        if name is None:
            continue
        ctor = name if name in idx.classes else (idx.qualify(name) or name)
        if ctor in idx.classes and plain_linear_subclass(idx, idx.classes[ctor]):
            ctor = "torch.nn.Linear"  # Falcon's FalconLinear: nn.Linear's own computation
        if attr not in info.submodules:
            info.submodules[attr] = Submodule(
                attr=attr,
                ctor=ctor,
                call=value,
                line=info.line,  # refined from Python's parser in build_index
                in_list=in_list,
            )


def appended_module(fn: cst.FunctionDef, name: str) -> cst.Call | None:
    """`NAME.append(Module(...))`, the one statement of a `for` loop in FN (a module list built by
    appending, then wrapped in `nn.ModuleList(NAME)`): the call building each element."""
    for loop in findall(fn, m.For()):
        body = loop.body.body  # type: ignore[attr-defined]
        if len(body) == 1 and m.matches(body[0], m.SimpleStatementLine(body=[m.Expr(m.Call(
                func=m.Attribute(value=m.Name(name), attr=m.Name("append")), args=[m.Arg(m.Call())]))])):
            return body[0].body[0].value.args[0].value  # type: ignore[attr-defined]
    return None


def plain_linear_subclass(idx: ModelIndex, info: ClassInfo) -> bool:
    """A file class deriving nn.Linear whose forward computes what nn.Linear does (`x @ self.weight.T`,
    plus `self.bias` when there is one): the engine's parallel linears stand in for it."""
    if not any(idx.qualify(b) in LINEAR_NAMES for b in info.bases):
        return False
    fwd = info.method("forward")
    methods = {st.name.value for st in info.node.body.body if isinstance(st, cst.FunctionDef)}
    if fwd is None or methods != {"forward"}:
        return False
    weight_t = m.BinaryOperation(operator=m.MatrixMultiply(), right=m.Attribute(
        value=m.Attribute(value=m.Name("self"), attr=m.Name("weight")), attr=m.Name("T")))
    return bool(findall(fwd, weight_t)) and not findall(fwd, m.Call())


EAGER_KEY = "eager"  # the attention implementation a port follows (its reference runs eager)


# the keys of HF's attention-implementation tables (`X_ATTENTION_CLASSES`)
ATTENTION_IMPLEMENTATIONS = frozenset({"eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"})


def table_class(idx: ModelIndex, func: cst.BaseExpression) -> str | None:
    """`X_ATTENTION_CLASSES[config._attn_implementation]` where the module defines the table as a
    dict literal: the class of its "eager" entry (HF's reference implementation), if it is a
    class of this file. The key may also be a local the caller computed (transformers 5.24's Falcon:
    `attn_implementation = "flash_attention_2" if ... else config._attn_implementation`) when every
    key of the table names an attention implementation, and so may a config field of the remote
    code's own (InternLM2: `config.attn_implementation`, defaulting to "eager")."""
    by_attr = m.matches(func, m.Subscript(value=m.Name(), slice=[m.SubscriptElement(m.Index(
        m.Attribute(attr=m.Name("_attn_implementation"))))]))
    if not by_attr and not m.matches(func, m.Subscript(value=m.Name(), slice=[m.SubscriptElement(m.Index(
            m.Name() | m.Attribute()))])):
        return None
    table = func.value.value  # type: ignore[attr-defined]
    for st in idx.module.body:
        if not m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name(table))],
                                                                   value=m.Dict())])):
            continue
        keys = [el.key.evaluated_value if isinstance(el, cst.DictElement) and isinstance(el.key, cst.SimpleString)
                else None for el in st.body[0].value.elements]  # type: ignore[attr-defined]
        if not by_attr and not (keys and set(keys) <= ATTENTION_IMPLEMENTATIONS):
            continue
        for el in st.body[0].value.elements:  # type: ignore[attr-defined]
            if isinstance(el, cst.DictElement) and m.matches(el.key, m.SimpleString()) \
                    and el.key.evaluated_value == EAGER_KEY and isinstance(el.value, cst.Name) \
                    and el.value.value in idx.classes:  # type: ignore[union-attr]
                return el.value.value
    return None


def table_alias(idx: ModelIndex, fn: cst.FunctionDef, name: str) -> str | None:
    """NAME bound once in FN, from an attention-implementation table (`attention_class =
    GPT2_ATTENTION_CLASSES[config._attn_implementation]`, transformers 4.x): the table's eager class."""
    binds = findall(fn, m.Assign(targets=[m.AssignTarget(m.Name(name))]))
    if len(binds) != 1 or not isinstance(binds[0].value, cst.Subscript):  # type: ignore[attr-defined]
        return None
    return table_class(idx, binds[0].value)  # type: ignore[attr-defined]


def is_module_subclass(idx: ModelIndex, info: ClassInfo, seen: frozenset[str] = frozenset()) -> bool:
    for base in info.bases:
        q = idx.qualify(base) or base
        if q in ("torch.nn.Module",) or q.endswith("PreTrainedModel") or q.endswith(
            "GradientCheckpointingLayer"
        ) or q in EMBEDDING_NAMES or q in LINEAR_NAMES:
            return True
        if base in idx.classes and base not in seen:
            if is_module_subclass(idx, idx.classes[base], seen | {base}):
                return True
    return False


__all__ = ["ModelIndex", "ClassInfo", "Submodule", "build_index", "parse", "m"]
