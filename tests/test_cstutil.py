"""The lean tree helpers agree with libcst's own: same nodes, same order (convert's speed rests on
them, its output must not)."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m
import pytest

from porter.analysis.cstutil import code, findall, names_in, statements, walk
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


def test_names_in_skips_attribute_tails_and_keywords():
    node = cst.parse_expression("f(a.b, key=c, *d)[e.f.g]")
    assert names_in(node) == {"f", "a", "c", "d", "e"}


def test_statements_never_enter_expressions(module):
    kinds = {type(n) for n, _ in statements(module)}
    assert cst.ClassDef in kinds and cst.SimpleStatementLine in kinds
    assert not any(issubclass(k, cst.BaseExpression) for k in kinds)
    top = [n.name.value for n, nested in statements(module) if isinstance(n, cst.ClassDef) and not nested]
    assert top == [st.name.value for st in module.body if isinstance(st, cst.ClassDef)]
