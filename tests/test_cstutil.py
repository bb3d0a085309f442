"""The lean tree helpers agree with libcst's own: same nodes, same order (convert's speed rests on
them, its output must not)."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m
import pytest

from porter.analysis.cstutil import code, findall, names_in, statements, transform, walk
from porter.source import resolve


class _Order(cst.CSTVisitor):
    def __init__(self) -> None:
        super().__init__()
        self.nodes: list[cst.CSTNode] = []

    def on_visit(self, node: cst.CSTNode) -> bool:
        self.nodes.append(node)
        return True


@pytest.fixture(scope="module", params=["gpt2", "mixtral", "opt"])
def module(request) -> cst.Module:
    return cst.parse_module(resolve(request.param).text)


def test_walk_meets_nodes_in_libcst_visit_order(module):
    order = _Order()
    module.visit(order)
    assert [type(n) for n in walk(module)] == [type(n) for n in order.nodes]
    assert len(list(walk(module))) == len(order.nodes) > 1000


@pytest.mark.parametrize("matcher", [
    m.Name(), m.Call(), m.Assign(), m.Call(func=m.Attribute(attr=m.Name("view"))),
    m.Name() | m.Attribute(), m.Assign(targets=[m.AssignTarget(m.Tuple())]),
    m.Return(value=m.Tuple()), m.SimpleString(),
])
def test_findall_equals_libcst_findall(module, matcher):
    for tree in (module, *[st for st in module.body if isinstance(st, cst.ClassDef)][:6]):
        ours = findall(tree, matcher)
        theirs = m.findall(tree, matcher)
        assert [code(n) for n in ours] == [code(n) for n in theirs]
        assert findall(tree, matcher) == ours  # the per-tree index gives the same answer again


class _RenameOneMethod(cst.CSTTransformer):
    """Renames the names of the first `forward` it meets: the new module keeps every other class
    and method object, as a rule's rewrite does."""

    def __init__(self) -> None:
        super().__init__()
        self.done = False

    def leave_FunctionDef(self, original, updated):
        if self.done or updated.name.value != "forward":
            return updated
        self.done = True
        return updated.visit(_Rename())


class _Rename(cst.CSTTransformer):
    def leave_Name(self, original, updated):
        return updated.with_changes(value=updated.value + "_x")


def test_findall_after_a_rewrite_reads_the_kept_classes_and_methods(module):
    findall(module, m.Name())  # the index of the original, and of each of its classes and methods
    edited = transform(module, _RenameOneMethod())
    assert edited is not module and sum(a is b for a, b in zip(edited.body, module.body)) > 1
    for matcher in (m.Name(), m.Name() | m.Attribute() | m.Call(), m.FunctionDef(), m.Assign()):
        assert [code(n) for n in findall(edited, matcher)] == [code(n) for n in m.findall(edited, matcher)]


def test_names_in_skips_attribute_tails_and_keywords():
    node = cst.parse_expression("f(a.b, key=c, *d)[e.f.g]")
    assert names_in(node) == {"f", "a", "c", "d", "e"}


def test_statements_never_enter_expressions(module):
    kinds = {type(n) for n, _ in statements(module)}
    assert cst.ClassDef in kinds and cst.SimpleStatementLine in kinds
    assert not any(issubclass(k, cst.BaseExpression) for k in kinds)
    top = [n.name.value for n, nested in statements(module) if isinstance(n, cst.ClassDef) and not nested]
    assert top == [st.name.value for st in module.body if isinstance(st, cst.ClassDef)]


class _Edits(cst.CSTTransformer):
    """Every kind of result a rule returns: removal from a body, an argument list and an optional
    field; flattening; replacement; a statement line emptied of its only statement. Records the
    callbacks it gets, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.stack: list[cst.CSTNode] = []

    def on_visit(self, node):
        self.calls.append(f"visit {type(node).__name__}")
        self.stack.append(node)
        if isinstance(node, cst.Decorator):
            self.stack.pop()
            return False
        return True

    def on_leave(self, original, updated):
        self.calls.append(f"leave {type(original).__name__}")
        if self.stack and self.stack[-1] is original:
            self.stack.pop()
        parent = self.stack[-1] if self.stack else None
        if isinstance(updated, cst.Expr) and isinstance(updated.value, cst.SimpleString):
            return cst.RemovalSentinel.REMOVE  # docstrings: their lines are emptied and dropped
        if isinstance(updated, cst.Arg) and updated.keyword is not None \
                and updated.keyword.value == "bias":
            return cst.RemovalSentinel.REMOVE
        if isinstance(updated, cst.Annotation) and isinstance(parent, cst.Param):
            return cst.RemovalSentinel.REMOVE  # Param.annotation: optional
        if isinstance(updated, cst.Comma) and isinstance(original, cst.Comma):
            return updated
        if isinstance(updated, cst.Name) and updated.value == "self":
            return updated.with_changes(value="this")
        if isinstance(updated, cst.SimpleStatementLine) and m.matches(
                updated, m.SimpleStatementLine(body=[m.Return()])):
            return cst.FlattenSentinel([cst.parse_statement("pass"), updated])
        return updated


def test_transform_equals_libcst_visit(module):
    ours, theirs = _Edits(), _Edits()
    new = transform(module, ours)
    ref = module.visit(theirs)
    assert new.code == ref.code
    assert new.deep_equals(ref)
    assert ours.calls == theirs.calls
    assert new.code != module.code and "this" in new.code


def test_transform_keeps_what_no_rule_changed(module):
    new = transform(module, cst.CSTTransformer())
    assert new is module  # libcst's visit would have rebuilt every node


def test_transform_refuses_what_libcst_refuses():
    class _DropTarget(cst.CSTTransformer):
        def leave_Name(self, original, updated):
            return cst.RemovalSentinel.REMOVE if updated.value == "x" else updated

    tree = cst.parse_module("y = x\n")  # Assign.value is required
    with pytest.raises(TypeError, match="RemovalSentinel"):
        tree.visit(_DropTarget())
    with pytest.raises(TypeError, match="RemovalSentinel"):
        transform(tree, _DropTarget())
