"""Rewrite rules: one small libcst transformer per rule, each carrying its own examples.

A rule is a `Rule` subclass with a stable `code`, a `name`, a `why` paragraph and `examples`
(before/after pairs). Subclasses register themselves; `porter rules` and the example test read
the registry, so a rule cannot exist without being listed and tested.

Provenance: while a rule runs, every node it changes is recorded with the enclosing
class/function, so `porter diff` labels hunks with the rules that made them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import SimpleNamespace
from typing import ClassVar

import libcst as cst

from porter.analysis.cstutil import EXPRESSION_LEVEL, UNITS, inner_types, transform
from porter.analysis.index import ModelIndex
from porter.plan.model import PortPlan
from porter.rules_data import StripTable, Target

REGISTRY: dict[str, type[Rule]] = {}

# node kinds that contain statements (cstutil.EXPRESSION_LEVEL: the kinds that never do)
_STATEMENT_LEVEL = (
    cst.Module, cst.BaseStatement, cst.BaseSmallStatement, cst.BaseSuite, cst.Else,
    cst.ExceptHandler, cst.ExceptStarHandler, cst.Finally, cst.MatchCase,
)


@dataclass(frozen=True)
class Example:
    before: str
    after: str
    # context an earlier rule would have left (e.g. {"needs_positions": {"Attn"}}), for rules
    # that act on what other rules found
    seed: dict = field(default_factory=dict)


@dataclass
class RewriteContext:
    idx: ModelIndex
    plan: PortPlan  # sealed: read, never changed
    table: StripTable  # the plan's strip table (plan.strip)
    target: Target
    provenance: dict[str, set[str]] = field(default_factory=dict)  # scope -> rule codes
    engine_symbols: set[str] = field(default_factory=set)  # neutral names the port uses
    single_return: set[str] = field(default_factory=set)  # classes whose forward now returns one value
    # classes whose forward now returns fewer values (still a tuple): (HF's count, the positions kept)
    narrowed_return: dict[str, tuple[int, tuple[int, ...]]] = field(default_factory=dict)
    needs_positions: set[str] = field(default_factory=set)  # classes whose forward reads positions
    removed_attrs: set[tuple[str, str]] = field(default_factory=set)  # (class, attr) modules removed
    removed_names: set[str] = field(default_factory=set)  # names bound by removed HF imports
    extra_taint: dict[str, set[str]] = field(default_factory=dict)  # class -> locals dropped by a rule
    # config field of a trained length -> what PT300 showed to be the identity within it ("what in where")
    trained_length: dict[str, list[str]] = field(default_factory=dict)
    # model class -> the residual PT330 threads through its layer loop (of the hidden width: it is a sum of it)
    fused_residual: dict[str, str] = field(default_factory=dict)
    # config properties of the source's transformers the engine's lacks (PT340): name -> its getter
    config_properties: dict = field(default_factory=dict)
    # the config's other names of a field (its attribute_map: num_hidden_layers -> n_layers)
    config_aliases: dict[str, str] = field(default_factory=dict)

    def use(self, symbol: str) -> str:
        """Record that the port uses an engine symbol; returns the name to write in code."""
        self.engine_symbols.add(symbol)
        return self.bound_name(symbol)

    def bound_name(self, symbol: str) -> str:
        """The name the port's import binds an engine symbol to: its own, or `Engine<name>` where the
        port keeps a class of the file under that name (a class the engine layer replaces goes)."""
        name = self.target.symbols[symbol].split(":")[1]
        return f"Engine{name}" if name in self.idx.classes and name in self.plan.classes else name

    def fork(self, target: Target) -> RewriteContext:
        """This context for one target, after the rules every target shares: its own copy of
        what the rules recorded. The index, plan and table are read, never changed (the plan is
        sealed, and holds the facts derived from the index), so every target shares those."""
        shared = {"idx", "plan", "table", "target"}
        return replace(self, target=target, **{
            f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in shared})


@dataclass
class SourceContext:
    """What the rules that run before indexing see (pipeline.BEFORE_INDEX): the source text, and
    no index or plan yet (an empty plan: every class counts as kept)."""

    text: str
    provenance: dict[str, set[str]] = field(default_factory=dict)  # scope -> rule codes
    renamed: dict[str, str] = field(default_factory=dict)  # a class's new name -> its name in the source (PT014)
    trained_length: dict[str, list[str]] = field(default_factory=dict)  # what PT300 recorded (RewriteContext's)
    plan: PortPlan | SimpleNamespace = field(default_factory=lambda: SimpleNamespace(classes=[], causal_lm=""))


class _SharedSymbols(Mapping):
    """The engine symbols' code names, where every target writes the same name (the module it
    is imported from is read only by the target-reading rules)."""

    def __init__(self, targets: list[Target]) -> None:
        keys = set().union(*(t.symbols for t in targets))
        self._names = {k: {t.symbols.get(k, ":").split(":")[1] for t in targets} for k in keys}

    def __getitem__(self, key: str) -> str:
        names = self._names[key]
        if len(names) != 1 or "" in names:
            raise AssertionError(f"engine symbol {key!r} differs between targets: only a rule with "
                                 "reads_target = True may use it")
        return f"<any target>:{next(iter(names))}"

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class SharedTarget:
    """What the rules before the first target-reading one see instead of a target: the symbol
    names every target shares. Any other attribute of a target (its package, config keyword,
    module paths) raises, so a rule that reads one without declaring `reads_target` fails loudly
    instead of giving every target the first one's code."""

    def __init__(self, targets: list[Target]) -> None:
        self.symbols = _SharedSymbols(targets)

    def __getattr__(self, attr: str):
        raise AttributeError(f"target.{attr} differs between targets: only a rule with "
                             "reads_target = True may read it")


class Rule(cst.CSTTransformer):
    code: ClassVar[str] = ""
    name: ClassVar[str] = ""
    why: ClassVar[str] = ""
    examples: ClassVar[list[Example]] = []
    # Most rules only rewrite the classes the port keeps; skipping the rest (other heads,
    # PreTrainedModel, module-level HF helpers) is most of convert's speed.
    visits_dropped_code: ClassVar[bool] = False
    # Which methods' bodies the rule needs to walk (None: all). Rules that work on a method as a
    # whole in leave_FunctionDef, or only on decorators/signatures, walk none.
    descend_methods: ClassVar[frozenset[str] | None] = None
    descends: ClassVar[bool] = True  # False: the rule works on the module/classes as a whole
    # True: the rule writes target-specific code (config keyword, import paths). The rules before
    # the first such one run once for all targets (convert's rewrite forks there).
    reads_target: ClassVar[bool] = False

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        # only handlers a rule defines: libcst's base classes define a no-op for every node type
        own = {n for k in cls.__mro__ if issubclass(k, Rule) for n in vars(k)}
        cls._dispatch = (
            {n[6:]: n for n in own if n.startswith("visit_") and "_" not in n[6:]},
            {n[6:]: n for n in own if n.startswith("leave_") and "_" not in n[6:]},
        )
        # a rule that handles statements only never needs to walk into an expression (no
        # statement can occur inside one): most of a method's nodes are expressions
        handled = {getattr(cst, t) for t in {*cls._dispatch[0], *cls._dispatch[1]}}
        inner = {t for t in handled if not issubclass(t, _STATEMENT_LEVEL)}
        if not inner:
            cls._skip = EXPRESSION_LEVEL
        elif inner <= {cst.Param, cst.Parameters}:
            # parameters are reached through a def's Parameters, never through an expression
            # that matters (a lambda's parameters carry no annotations or defaults to rewrite)
            cls._skip = tuple(k for k in EXPRESSION_LEVEL if k is not cst.Parameters)
        else:
            cls._skip = ()
        cls._skipped = {}
        cls._handled = frozenset(handled)
        if cls.code:
            if cls.code in REGISTRY and REGISTRY[cls.code] is not cls:
                raise ValueError(f"duplicate rule code {cls.code}")
            REGISTRY[cls.code] = cls

    @classmethod
    def classes(cls, ctx: RewriteContext) -> set[str] | None:
        """The only classes the rule can change (None: any kept class); the others are not walked."""
        return None

    def __init__(self, ctx: RewriteContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.plan = ctx.plan
        self._only_classes = self.classes(ctx)
        self.scope: list[str] = []
        self.changed = False

    # -- scope tracking for provenance ---------------------------------------------------
    def visit_ClassDef(self, node: cst.ClassDef) -> bool | None:
        self.scope.append(node.name.value)
        if not self.descends:
            return False
        if self.visits_dropped_code or len(self.scope) > 1:
            return True
        only = self._only_classes
        if only is not None and node.name.value not in only:
            return False
        return node.name.value in self.plan.classes or (not self.plan.causal_lm)

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef):
        self.scope.pop()
        return updated

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool | None:
        self.scope.append(node.name.value)
        if not self.descends:
            return False
        if len(self.scope) == 2 and self.descend_methods is not None:
            return node.name.value in self.descend_methods
        if self.visits_dropped_code or len(self.scope) > 1 or not self.plan.causal_lm:
            return True
        return False  # module-level helpers: HF-only, pruned at the end

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        self.scope.pop()
        return updated

    @classmethod
    def applies(cls, ctx: RewriteContext) -> bool:
        """False when the rule cannot change this file (e.g. a name it needs never occurs): the
        rewrite skips its walk. Each rule's examples must satisfy it (checked with the examples)."""
        return True

    def rewrite(self, module: cst.Module) -> cst.Module:
        """This rule over a whole module (how pipeline.run applies it)."""
        return transform(module, self)

    @property
    def current_class(self) -> str | None:
        return self.scope[0] if self.scope else None

    @property
    def current_function(self) -> str | None:
        return self.scope[-1] if len(self.scope) > 1 else None

    def mark(self, scope: str | None = None) -> None:
        key = scope or (".".join(self.scope) if self.scope else "<module>")
        self.ctx.provenance.setdefault(key, set()).add(self.code)
        self.changed = True

    # Dispatch is called for every node of every pass: a per-class table of the rule's own
    # visit_/leave_ methods replaces libcst's string-built getattr, and no rule uses libcst's
    # per-attribute hooks (visit_<Node>_<attr>), so those are no-ops (a third of a pass's time).
    # (built for every subclass in __init_subclass__, so subclasses with their own __init__ get it)
    _dispatch: ClassVar[tuple[dict[str, str], dict[str, str]]] = ({}, {})

    _skip: ClassVar[tuple[type, ...]] = ()  # node kinds that cannot hold what the rule handles
    _handled: ClassVar[frozenset[type]] = frozenset()  # the node types of the rule's handlers
    _skipped: ClassVar[dict[type, bool]] = {}  # node type -> one of _skip (isinstance of an ABC is slow)

    def on_visit(self, node) -> bool:
        if self._skip:
            skipped = self._skipped.get(type(node))
            if skipped is None:
                skipped = self._skipped[type(node)] = isinstance(node, self._skip)
            if skipped:
                return False
        name = self._dispatch[0].get(type(node).__name__)
        if name is not None and getattr(self, name)(node) is False:
            return False
        # a class or method holding no node the rule handles: nothing below it can change, and no
        # handler would run there (the walk would only pass through)
        return type(node) not in UNITS or not self._handled.isdisjoint(inner_types(node))

    def on_visit_attribute(self, node, attribute) -> None:
        return None

    def on_leave_attribute(self, original_node, attribute) -> None:
        return None

    def on_leave(self, original_node, updated_node):
        name = self._dispatch[1].get(type(original_node).__name__)
        if name is None:
            return updated_node
        leave = getattr(self, name)
        result = leave(original_node, updated_node)
        if result is not updated_node:
            if isinstance(original_node, (cst.ClassDef, cst.FunctionDef)):
                name = original_node.name.value
                self.mark(".".join([*self.scope, name]) if self.scope else name)
            else:
                self.mark()
        return result

    def kept(self, cls: str | None) -> bool:
        return cls is not None and cls in self.plan.classes
