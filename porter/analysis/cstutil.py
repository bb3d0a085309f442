"""Small helpers over libcst nodes shared by the index, the plan and the rewrite passes."""

from __future__ import annotations

import dataclasses

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


class _FieldOrder(cst.CSTVisitor):
    """Records the order in which libcst visits one node's fields (its attribute hooks fire in
    that order), without descending: read once per node type."""

    def __init__(self, root: cst.CSTNode) -> None:
        super().__init__()
        self.root = root
        self.order: list[str] = []

    def on_visit(self, node: cst.CSTNode) -> bool:
        return node is self.root

    def on_visit_attribute(self, node: cst.CSTNode, attribute: str) -> None:
        if node is self.root and attribute not in self.order:
            self.order.append(attribute)


_DO_NOT_CARE = m.DoNotCare()
_FIELD_ORDER: dict[type, tuple[str, ...]] = {}


def _fields(node: cst.CSTNode) -> tuple[str, ...]:
    kind = type(node)
    order = _FIELD_ORDER.get(kind)
    if order is None:
        rec = _FieldOrder(node)
        node.visit(rec)
        order = _FIELD_ORDER[kind] = tuple(rec.order)
    return order


NODE, SEQUENCE, OTHER = 1, 2, 0
_KIND: dict[type, int] = {}


def kind_of(kind: type) -> int:
    """NODE for a libcst node type, SEQUENCE for a list or tuple, OTHER for anything else. libcst
    nodes are ABCs, whose isinstance is slow; a walk asks this of every field it passes."""
    found = _KIND.get(kind)
    if found is None:
        found = _KIND[kind] = (NODE if issubclass(kind, cst.CSTNode)
                               else SEQUENCE if issubclass(kind, (list, tuple)) else OTHER)
    return found


def children(node: cst.CSTNode) -> list[cst.CSTNode]:
    """A node's children in libcst's visiting order, read from its fields (libcst's own
    `.children` runs a visit that rebuilds the node)."""
    kids: list[cst.CSTNode] = []
    get = _KIND.get
    order = _FIELD_ORDER.get(type(node))
    for name in _fields(node) if order is None else order:
        value = getattr(node, name)
        k = get(type(value))
        if k is None:
            k = kind_of(type(value))
        if k == NODE:
            kids.append(value)
        elif k == SEQUENCE:
            for v in value:
                kv = get(type(v))
                if (kind_of(type(v)) if kv is None else kv) == NODE:
                    kids.append(v)
    return kids


def walk(tree: cst.CSTNode, prune=None):
    """Every node of `tree`, pre-order, in the order a libcst visitor meets them — read from the
    nodes' fields instead of through `visit`, which rebuilds every node it passes (read-only
    visitors too): several times faster. `prune(node)` -> the children to walk instead (or None
    for all of them)."""
    stack = [tree]
    pop, push = stack.pop, stack.append
    while stack:
        node = pop()
        yield node
        kids = prune(node) if prune is not None else None
        if kids is None:
            kids = children(node)
        for kid in reversed(kids):
            push(kid)



_SINGLE: dict[tuple[type, str], str] = {}


def _single_kind(kind: type, name: str) -> str:
    """How libcst visits a one-node field: "required", "optional" (removed -> None) or
    "sentinel" (removed -> MaybeSentinel.DEFAULT), read from the field's type."""
    key = (kind, name)
    found = _SINGLE.get(key)
    if found is None:
        import typing

        hint = typing.get_type_hints(kind)[name]
        args = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else ()
        found = ("optional" if type(None) in args
                 else "sentinel" if cst.MaybeSentinel in args else "required")
        _SINGLE[key] = found
    return found


def transform(node: cst.CSTNode, visitor: cst.CSTTransformer):
    """`node.visit(visitor)` for a transformer whose attribute hooks are no-ops (porter's rules),
    with libcst's results — same callbacks in the same order, same removal and flattening — but
    a node none of whose children changed is kept instead of rebuilt. libcst rebuilds (and
    re-validates) every node it passes, and most of a rule's walk changes nothing."""
    if visitor.on_visit(node):
        changes: dict = {}
        kind = type(node)
        order = _FIELD_ORDER.get(kind)
        for name in _fields(node) if order is None else order:
            value = getattr(node, name)
            k = _KIND.get(type(value))
            if k is None:
                k = kind_of(type(value))
            if k == NODE:
                new = transform(value, visitor)
                if new is value:
                    continue
                if isinstance(new, cst.FlattenSentinel):
                    raise TypeError(f"We got a FlattenSentinel while visiting a {type(value).__name__}. "
                                    "This node's parent does not allow for it to be replaced with a sequence.")
                if isinstance(new, cst.RemovalSentinel):
                    how = _single_kind(kind, name)
                    if how == "required":
                        raise TypeError(f"We got a RemovalSentinel while visiting a {type(value).__name__}. "
                                        "This node's parent does not allow it to be removed.")
                    new = None if how == "optional" else cst.MaybeSentinel.DEFAULT
                changes[name] = new
            elif k == SEQUENCE:
                body = name == "body" and kind in (cst.Module, cst.IndentedBlock)
                out, changed = [], False
                for child in value:
                    if kind_of(type(child)) != NODE:
                        out.append(child)
                        continue
                    new = transform(child, visitor)
                    if new is child:
                        out.append(child)
                        continue
                    changed = True
                    for item in (new if isinstance(new, cst.FlattenSentinel) else (new,)):
                        if isinstance(item, cst.RemovalSentinel):
                            continue
                        # libcst drops a statement line a rule emptied (body sequences only)
                        if body and not child._is_removable() and item._is_removable():
                            continue
                        out.append(item)
                if changed:
                    changes[name] = tuple(out)
        updated = node.with_changes(**changes) if changes else node
    else:
        updated = node
    result = visitor.on_leave(node, updated)
    if (result is not updated and kind_of(type(result)) != NODE
            and not isinstance(result, (cst.RemovalSentinel, cst.FlattenSentinel))):
        raise cst.CSTValidationError(
            f"Expected a node of type CSTNode or a RemovalSentinel, but got a return value of "
            f"{type(result).__name__}")
    return result

# node kinds that never hold a statement
EXPRESSION_LEVEL = (cst.BaseExpression, cst.Parameters, cst.Decorator, cst.Annotation, cst.Arg)


def statements(tree: cst.CSTNode):
    """(node, nested) for every node of `tree` outside expressions, in libcst's order; `nested`:
    inside a class or function body."""
    stack: list[tuple[cst.CSTNode, bool]] = [(tree, False)]
    while stack:
        node, nested = stack.pop()
        yield node, nested
        inner = nested or type(node) in (cst.ClassDef, cst.FunctionDef)
        stack.extend((k, inner) for k in reversed(children(node)) if not isinstance(k, EXPRESSION_LEVEL))


def _node_types(matcher) -> tuple[type, ...]:
    if isinstance(matcher, m.OneOf):
        return tuple(t for option in matcher.options for t in _node_types(option))
    return (getattr(cst, type(matcher).__name__),)


_MATCHER_FIELDS: dict[type, tuple[str, ...]] = {}


def _matcher_fields(kind: type) -> tuple[str, ...]:
    found = _MATCHER_FIELDS.get(kind)
    if found is None:
        found = _MATCHER_FIELDS[kind] = tuple(f.name for f in dataclasses.fields(kind))
    return found


def findall(tree: cst.CSTNode, matcher: m.BaseMatcherNode) -> list[cst.CSTNode]:
    """`m.findall` for a node-type matcher (`m.Name()`, `m.Call(func=...)`, or a `|` of them): the
    same nodes in the same order, found by a lean walk and then checked with `m.matches`."""
    kinds = _node_types(matcher)
    by_type = _by_type(tree)
    if len(kinds) == 1:
        found = by_type.get(kinds[0], ())
    else:
        found = sorted((p for k in set(kinds) for p in by_type.get(k, ())), key=lambda p: p[0])
    if not isinstance(matcher, m.OneOf) and all(
            getattr(matcher, name) is _DO_NOT_CARE for name in _matcher_fields(type(matcher))):
        return [n for _, n in found]  # a bare `m.Name()`: the type decides
    return [n for _, n in found if m.matches(n, matcher)]


_BY_TYPE: dict[int, tuple[cst.CSTNode, int, dict[type, list[tuple[int, cst.CSTNode]]]]] = {}
UNITS = (cst.ClassDef, cst.FunctionDef)  # kept across a rule's rewrite unless it changed them


def _by_type(tree: cst.CSTNode) -> dict[type, list[tuple[int, cst.CSTNode]]]:
    """The nodes of `tree` grouped by type, with their walk positions. libcst nodes are immutable,
    so this is built once per tree: the plan and the rules search the same classes and methods
    for different things many times."""
    return _grouped(tree)[1]


def _grouped(tree: cst.CSTNode) -> tuple[int, dict[type, list[tuple[int, cst.CSTNode]]]]:
    """(the number of nodes in TREE, _by_type(tree)). A class or method inside TREE is read from
    its own entry: a rule's rewrite makes a new module but keeps the classes and methods it did
    not change, so the next rule's search of the module walks only what changed."""
    hit = _BY_TYPE.get(id(tree))
    if hit is not None and hit[0] is tree:
        return hit[1], hit[2]
    groups: dict[type, list[tuple[int, cst.CSTNode]]] = {}
    pos = 0
    stack = [tree]
    while stack:
        node = stack.pop()
        if node is not tree and type(node) in UNITS:
            size, inner = _grouped(node)  # a walk of its own: contiguous positions, in order
            for kind, found in inner.items():
                groups.setdefault(kind, []).extend([(pos + at, n) for at, n in found])
            pos += size
            continue
        groups.setdefault(type(node), []).append((pos, node))
        pos += 1
        stack.extend(reversed(children(node)))
    if len(_BY_TYPE) > 5000:
        _BY_TYPE.clear()
    _BY_TYPE[id(tree)] = (tree, pos, groups)
    return pos, groups


def inner_types(node: cst.CSTNode) -> set[type]:
    """The node types below NODE (itself excluded, unless it holds another of its own type)."""
    groups = _grouped(node)[1]
    own = type(node)
    return {kind for kind, found in groups.items() if kind is not own or len(found) > 1}


_CODE: dict[int, tuple[cst.CSTNode, str]] = {}
_EMPTY_MODULE = cst.Module(body=[])


def code(node: cst.CSTNode) -> str:
    """The source of a node. libcst nodes are immutable, so one node's code is generated once
    (rules ask for the same class or method's text many times)."""
    hit = _CODE.get(id(node))
    if hit is not None and hit[0] is node:
        return hit[1]
    text = _EMPTY_MODULE.code_for_node(node)
    if len(_CODE) > 20000:
        _CODE.clear()
    _CODE[id(node)] = (node, text)
    return text


def expr(text: str) -> cst.BaseExpression:
    return cst.parse_expression(text)


def stmt(text: str) -> cst.BaseStatement:
    return cst.parse_statement(text)


def _read_part(node: cst.CSTNode):
    # attribute tails and keyword-argument names are not reads: walk only the value
    kind = type(node)
    if kind is cst.Attribute or kind is cst.Arg:
        return [node.value]  # type: ignore[attr-defined]
    return None


def names_in(node: cst.CSTNode) -> set[str]:
    """Every bare Name read in an expression (attribute tails excluded)."""
    return {n.value for n in walk(node, _read_part) if type(n) is cst.Name}  # type: ignore[attr-defined]


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
    if m.matches(it, m.Call(func=m.Name("range"))) and isinstance(target, cst.Name):
        return _indexed_element(node, target.value)
    return None


def _indexed_element(node: cst.For, index: str) -> tuple[str, str] | None:
    """`for index in range(self.num_layers): layer = self.layers[index]` (ChatGLM's remote code):
    ("layer", "layers") when the loop body opens by binding the element at the loop index."""
    body = getattr(node.body, "body", [])
    first = body[0] if body else None
    if m.matches(first, m.SimpleStatementLine(body=[m.Assign(
            targets=[m.AssignTarget(m.Name())],
            value=m.Subscript(slice=[m.SubscriptElement(m.Index(m.Name(index)))]))])):
        a = first.body[0]  # type: ignore[union-attr]
        attr = self_attr(a.value.value)  # type: ignore[attr-defined]
        if attr:
            return a.targets[0].target.value, attr  # type: ignore[attr-defined]
    return None


def cross_attention_arm(test: cst.BaseExpression, flags: frozenset[str]) -> bool | None:
    """True when `test` is a cross-attention flag (`self.is_cross_attention`, `is_cross_attention`,
    `config.add_cross_attention`, `encoder_hidden_states is not None`), False when it is its negation,
    None otherwise."""
    def flag(e: cst.BaseExpression) -> bool:
        if isinstance(e, cst.Name):
            return e.value in flags
        return m.matches(e, m.Attribute(value=m.Name("self") | m.Name("config"))) and e.attr.value in flags  # type: ignore[attr-defined]

    if flag(test):
        return True
    if m.matches(test, m.UnaryOperation(operator=m.Not())) and flag(test.expression):  # type: ignore[attr-defined]
        return False
    if m.matches(test, m.Comparison(left=m.Name(), comparisons=[m.ComparisonTarget(m.Is() | m.IsNot(), m.Name("None"))])) \
            and flag(test.left):  # `encoder_hidden_states is not None`: an input only cross-attention is given
        return isinstance(test.comparisons[0].operator, cst.IsNot)  # type: ignore[attr-defined]
    if m.matches(test, m.BooleanOperation(operator=m.And())) and (  # `is_cross_attention and cache is not None`
            cross_attention_arm(test.left, flags) is True or cross_attention_arm(test.right, flags) is True):  # type: ignore[attr-defined]
        return True  # (false for self-attention, like the flag)
    return None


class _KeepSelfAttention(cst.CSTTransformer):
    def __init__(self, flags: frozenset[str]) -> None:
        super().__init__()
        self.flags = flags
        self.links: set[int] = set()

    def visit_If(self, node):
        note_elif(node, self.links)

    def leave_If(self, original, updated):
        if id(original) in self.links:  # an `elif`: the `if` it belongs to resolves the chain
            return updated
        return self_attention_arm(updated, self.flags)

    def leave_IfExp(self, original, updated):
        return self_attention_value(updated, self.flags)


def self_attention_value(node: cst.IfExp, flags: frozenset[str]) -> cst.BaseExpression:
    """`key_value_states if is_cross_attention else hidden_states` -> `hidden_states`."""
    arm = cross_attention_arm(node.test, flags)
    return node if arm is None else node.orelse if arm else node.body


def note_elif(node: cst.If, links: set[int]) -> None:
    """Remember the `elif` of NODE (by id): a visitor leaves it to `self_attention_arm` of NODE."""
    if isinstance(node.orelse, cst.If):
        links.add(id(node.orelse))


def _self_attention_links(node: cst.If, flags: frozenset[str]) -> cst.If:
    """NODE with each `elif` of its chain on a cross-attention flag resolved: `elif flag: A <rest>`
    -> `<rest>`, `elif not flag: A <rest>` -> `else: A`."""
    link = node.orelse
    if not isinstance(link, cst.If):
        return node
    arm = cross_attention_arm(link.test, flags)
    if arm is None:
        return node.with_changes(orelse=_self_attention_links(link, flags))
    if arm is False:
        return node.with_changes(orelse=cst.Else(body=link.body, leading_lines=link.leading_lines))
    return _self_attention_links(node.with_changes(orelse=link.orelse), flags)


def self_attention_arm(node: cst.If, flags: frozenset[str]):
    """An `if` on a cross-attention flag -> what is left of it for self-attention (its false arm:
    the body, the `elif`, or nothing); any other `if` unchanged. The `elif`s of its chain are
    resolved so too (a visitor calls this on the first `if` of a chain only: `note_elif`)."""
    node = _self_attention_links(node, flags)
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
    """`node` with every `if` on a cross-attention flag replaced by its false arm (`node` itself
    when it has none: the per-tree index and code caches keep serving it)."""
    if node is None or not flags:
        return node
    return transform(node, _KeepSelfAttention(flags))
