"""Small helpers over libcst nodes shared by the index, the plan and the rewrite passes."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m


def dotted(node: cst.BaseExpression | None) -> str | None:
    """`nn.Linear` -> "nn.Linear"; `Linear` -> "Linear"; anything else -> None."""
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        head = dotted(node.value)
        return None if head is None else f"{head}.{node.attr.value}"
    return None


def self_attr(node: cst.BaseExpression) -> str | None:
    """`self.q_proj` -> "q_proj"."""
    if m.matches(node, m.Attribute(value=m.Name("self"), attr=m.Name())):
        return node.attr.value  # type: ignore[union-attr]
    return None


def self_call_attr(node: cst.CSTNode) -> str | None:
    """`self.q_proj(x)` -> "q_proj"."""
    if isinstance(node, cst.Call):
        return self_attr(node.func)
    return None


class _Collect(cst.CSTVisitor):
    """Collects the nodes of one type in a tree with the leanest libcst visit: no per-attribute
    hooks and no method lookup by name (m.findall's generic visitor costs twice as much)."""

    def __init__(self, node_types: tuple[type, ...]) -> None:
        super().__init__()
        self.node_types = node_types
        self.found: list[cst.CSTNode] = []

    def on_visit(self, node: cst.CSTNode) -> bool:
        if type(node) in self.node_types:
            self.found.append(node)
        return True

    def on_leave(self, original_node: cst.CSTNode) -> None:
        return None

    def on_visit_attribute(self, node: cst.CSTNode, attribute: str) -> None:
        return None

    def on_leave_attribute(self, original_node: cst.CSTNode, attribute: str) -> None:
        return None


def _node_types(matcher) -> tuple[type, ...]:
    if isinstance(matcher, m.OneOf):
        return tuple(t for option in matcher.options for t in _node_types(option))
    return (getattr(cst, type(matcher).__name__),)


def findall(tree: cst.CSTNode, matcher: m.BaseMatcherNode) -> list[cst.CSTNode]:
    """`m.findall` for a node-type matcher (`m.Name()`, `m.Call(func=...)`, or a `|` of them): the
    same nodes in the same order, found by a lean collector and then checked with `m.matches`."""
    collector = _Collect(_node_types(matcher))
    tree.visit(collector)
    return [n for n in collector.found if m.matches(n, matcher)]


def code(node: cst.CSTNode) -> str:
    return cst.Module(body=[]).code_for_node(node)


def expr(text: str) -> cst.BaseExpression:
    return cst.parse_expression(text)


def stmt(text: str) -> cst.BaseStatement:
    return cst.parse_statement(text)


class _Names(_Collect):
    """Bare names read in a tree: attribute tails and keyword-argument names are not reads."""

    def __init__(self) -> None:
        super().__init__((cst.Name,))
        self.names: set[str] = set()

    def on_visit(self, node: cst.CSTNode) -> bool:
        kind = type(node)
        if kind is cst.Name:
            self.names.add(node.value)  # type: ignore[attr-defined]
        elif kind is cst.Attribute or kind is cst.Arg:
            node.value.visit(self)  # type: ignore[attr-defined]
            return False
        return True


def names_in(node: cst.CSTNode) -> set[str]:
    """Every bare Name read in an expression (attribute tails excluded)."""
    collector = _Names()
    node.visit(collector)
    return collector.names


def assigned_names(target: cst.BaseAssignTargetExpression) -> list[str]:
    if isinstance(target, cst.Name):
        return [target.value]
    if isinstance(target, (cst.Tuple, cst.List)):
        out: list[str] = []
        for el in target.elements:
            out.extend(assigned_names(el.value))  # type: ignore[arg-type]
        return out
    if isinstance(target, cst.StarredElement):
        return assigned_names(target.value)  # type: ignore[arg-type]
    return []


def find_method(cls: cst.ClassDef, name: str) -> cst.FunctionDef | None:
    for st in cls.body.body:
        if isinstance(st, cst.FunctionDef) and st.name.value == name:
            return st
    return None


def param_names(fn: cst.FunctionDef) -> list[str]:
    p = fn.params
    out = [x.name.value for x in (*p.posonly_params, *p.params, *p.kwonly_params)]
    if isinstance(p.star_arg, cst.Param):
        out.append(p.star_arg.name.value)
    if p.star_kwarg is not None:
        out.append(p.star_kwarg.name.value)
    return out


def loop_module(node: cst.For) -> tuple[str, str] | None:
    """`for layer in self.layers[...]:` (or `for i, layer in enumerate(self.layers)`) ->
    ("layer", "layers"): the loop variable is a call of that sub-module's elements."""
    it, target = node.iter, node.target
    if (
        m.matches(it, m.Call(func=m.Name("enumerate")))
        and isinstance(target, cst.Tuple)
        and len(target.elements) == 2
    ):
        it, target = it.args[0].value, target.elements[1].value  # type: ignore[attr-defined]
    if isinstance(it, cst.Subscript):
        it = it.value
    attr = self_attr(it)
    if attr and isinstance(target, cst.Name):
        return target.value, attr
    return None


def cross_attention_arm(test: cst.BaseExpression, flags: frozenset[str]) -> bool | None:
    """True when `test` is a cross-attention flag (`self.is_cross_attention`, `is_cross_attention`,
    `config.add_cross_attention`), False when it is its negation, None otherwise."""
    def flag(e: cst.BaseExpression) -> bool:
        if isinstance(e, cst.Name):
            return e.value in flags
        return m.matches(e, m.Attribute(value=m.Name("self") | m.Name("config"))) and e.attr.value in flags  # type: ignore[attr-defined]

    if flag(test):
        return True
    if m.matches(test, m.UnaryOperation(operator=m.Not())) and flag(test.expression):  # type: ignore[attr-defined]
        return False
    return None


class _KeepSelfAttention(cst.CSTTransformer):
    def __init__(self, flags: frozenset[str]) -> None:
        super().__init__()
        self.flags = flags

    def leave_If(self, original, updated):
        return self_attention_arm(updated, self.flags)


def self_attention_arm(node: cst.If, flags: frozenset[str]):
    """An `if` on a cross-attention flag -> what is left of it for self-attention (its false arm:
    the body, the `elif`, or nothing); any other `if` unchanged."""
    arm = cross_attention_arm(node.test, flags)
    if arm is None:
        return node
    if arm is False:
        return cst.FlattenSentinel(list(node.body.body))
    if node.orelse is None:
        return cst.RemoveFromParent()
    if isinstance(node.orelse, cst.If):
        return node.orelse
    return cst.FlattenSentinel(list(node.orelse.body.body))


def resolve_cross_attention(node, flags: frozenset[str]):
    """`node` with every `if` on a cross-attention flag replaced by its false arm."""
    if node is None or not flags:
        return node
    return node.visit(_KeepSelfAttention(flags))
