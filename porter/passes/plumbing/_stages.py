"""What crosses a pipeline-stage boundary of a base model (PT320, PT321), read by dataflow.

The base model's forward is three parts around its one loop over the layer list: the statements
that compute the loop's inputs from the token embedding (the first stage's), the loop, and what
follows it (the last stage's). The tensors the loop carries from one layer to the next, and the
embedding-derived tensors the loop or what follows reads, cross a stage boundary; each must be
shown to have the embedding's width (the engine's receiving buffers have that width).
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass, field

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import assigned_names, code, findall, loop_module, self_attr

_WIDTH_KEEPING_METHODS = {"to", "float", "half", "bfloat16", "type_as", "contiguous", "clone"}
# modules whose output has their input's shape: torch's norms (and the file's own RMSNorm classes,
# the plan's `norms`, which the engine's norm replaces)
WIDTH_KEEPING_MODULES = {"torch.nn.LayerNorm", "torch.nn.RMSNorm"}


def width_keeping(info, plan) -> frozenset[str]:
    """The attributes of a model class (its ClassInfo) whose call gives its argument's shape: its
    norms (torch's, and the file's own the plan replaces with the engine's)."""
    return frozenset(a for a, s in info.submodules.items() if not s.in_list
                     and (s.ctor in WIDTH_KEEPING_MODULES or s.ctor in plan.norms))


@dataclass
class Stages:
    loop_at: int  # index of the layer loop among the forward's statements
    layers: str  # the layer list attribute
    first: list[int]  # indices of the statements before the loop only the first stage runs
    carried: list[str]  # names crossing the boundary, in the order the forward binds them
    last_only: list[str] = field(default_factory=list)  # attributes only what follows the loop calls


def _tree(node: cst.CSTNode) -> ast.Module:
    return ast.parse(textwrap.dedent(code(node)))


def reads(node: cst.CSTNode) -> set[str]:
    return {n.id for n in ast.walk(_tree(node)) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def writes(node: cst.CSTNode) -> set[str]:
    return {n.id for n in ast.walk(_tree(node)) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


def self_calls(node: cst.CSTNode) -> set[str]:
    """Attributes of self the node reads (`self.norm(x)`, `self.embed_tokens.weight`)."""
    return {n.attr for n in ast.walk(_tree(node)) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id == "self"}


def _has(node: cst.CSTNode, *kinds: type) -> bool:
    return any(isinstance(n, kinds) for n in ast.walk(_tree(node)))


def layer_loops(fwd: cst.FunctionDef, lists: set[str]) -> list[cst.For]:
    return [f for f in findall(fwd, m.For()) if (lm := loop_module(f)) and lm[1] in lists]  # type: ignore[arg-type]


def loop_list(loop: cst.For) -> tuple[cst.BaseExpression, cst.BaseExpression | None, bool]:
    """`for v in [enumerate(]self.X[[:K]][)]` -> (self.X, K or None, enumerated)."""
    it, enum = loop.iter, False
    if m.matches(it, m.Call(func=m.Name("enumerate"), args=[m.Arg(keyword=None)])):
        it, enum = it.args[0].value, True  # type: ignore[attr-defined]
    bound = None
    if isinstance(it, cst.Subscript):
        sl = it.slice[0].slice if len(it.slice) == 1 else None
        if not isinstance(sl, cst.Slice) or sl.lower is not None or sl.step is not None:
            raise ValueError("not a prefix slice")
        bound = sl.upper
        if bound is None:
            raise ValueError("no bound")
        it = it.value
    if self_attr(it) is None:
        raise ValueError("not an attribute of self")
    return it, bound, enum


def _width_expr(e: ast.AST, wide: set[str], embed: str, keeping: frozenset[str] = frozenset()) -> bool:
    """The expression has the embedding's width, given the names that have it. KEEPING: attributes
    of self whose call gives its argument's shape (norms)."""
    if isinstance(e, ast.Name):
        return e.id in wide
    if isinstance(e, ast.BinOp) and isinstance(e.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        return _width_expr(e.left, wide, embed, keeping) or _width_expr(e.right, wide, embed, keeping)
    if isinstance(e, ast.Call) and isinstance(e.func, ast.Attribute):
        f = e.func
        if isinstance(f.value, ast.Name) and f.value.id == "self" and f.attr == embed:
            return True
        if isinstance(f.value, ast.Name) and f.value.id == "self" and f.attr in keeping:
            return len(e.args) == 1 and not e.keywords and _width_expr(e.args[0], wide, embed, keeping)
        return f.attr in _WIDTH_KEEPING_METHODS and _width_expr(f.value, wide, embed, keeping)
    return False


def wide_after(stmt: cst.CSTNode, wide: set[str], embed: str, layer_var: str | None = None,
                keeping: frozenset[str] = frozenset()) -> set[str]:
    """The names of the embedding's width after STMT (a layer call keeps its first argument's width)."""
    tree = _tree(stmt)
    out = set(wide)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            value = node.value
            ok = value is not None and (_width_expr(value, out, embed, keeping) or (
                layer_var is not None and isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
                and value.func.id == layer_var and bool(value.args)
                and _width_expr(value.args[0], out, embed, keeping)))
            if isinstance(node, ast.AugAssign):
                ok = ok or _width_expr(node.target, out, embed, keeping)
            for t in targets:
                if isinstance(t, ast.Name):
                    (out.add if ok else out.discard)(t.id)
                else:
                    out -= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
    return out


def _starts_residual(st: cst.BaseStatement, residual: str | None) -> bool:
    """`residual = None` before the loop: the first stage starts the residual PT330 threads."""
    return residual is not None and m.matches(st, m.SimpleStatementLine(body=[m.Assign(
        targets=[m.AssignTarget(m.Name(residual))], value=m.Name("None"))]))


def _threads_residual(st: cst.BaseStatement, residual: str, layer_var: str, wide: set[str]) -> set[str]:
    """`h, residual = layer(h, ..., residual=residual)`: both of the hidden width when h is."""
    call = m.Call(func=m.Name(layer_var), args=[m.Arg(m.Name(), keyword=None), m.ZeroOrMore()])
    pair = m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Tuple(elements=[
        m.Element(m.Name()), m.Element(m.Name(residual))]))], value=call)])
    if not m.matches(st, pair):
        return set()
    assign = st.body[0]  # type: ignore[attr-defined]
    h = assign.targets[0].target.elements[0].value.value
    return {h, residual} if assign.value.args[0].value.value == h and h in wide else set()


def analyse(cls: cst.ClassDef, fwd: cst.FunctionDef, lists: set[str], embed: str,
            residual: str | None = None, keeping: frozenset[str] = frozenset()) -> Stages:
    """The stages of the base model's forward; ValueError (with why) where they cannot be shown.
    RESIDUAL: the name PT330 threads through the loop (started as None on the first stage).
    KEEPING: the model's attributes whose call gives a tensor of its argument's shape (its norms:
    BLOOM's `word_embeddings_layernorm` over the embedding)."""
    loops = layer_loops(fwd, lists)
    if len(loops) != 1:
        raise ValueError(f"{len(loops)} loops over a layer list")
    loop = loops[0]
    body = list(fwd.body.body)
    if loop not in body or loop.orelse is not None:
        raise ValueError("the layer loop is not a plain statement of forward")
    at = body.index(loop)
    loop_list(loop)
    layers = loop_module(loop)[1]  # type: ignore[index]
    layer_var = loop_module(loop)[0]  # type: ignore[index]
    pre, post = body[:at], body[at + 1:]
    if any(_has(s, ast.Return, ast.Yield) for s in pre) or _has(loop, ast.Return, ast.Break, ast.Yield):
        raise ValueError("forward leaves before the end of the loop")
    derived = {"input_ids", "inputs_embeds"}
    first: list[int] = []
    for i, st in enumerate(pre):
        if _starts_residual(st, residual):
            first.append(i)
            derived.add(residual)  # type: ignore[arg-type]
        elif reads(st) & derived:
            first.append(i)
            derived |= writes(st)
        else:
            touched = set().union(*(reads(pre[j]) | writes(pre[j]) for j in first)) if first else set()
            if writes(st) & touched:
                raise ValueError("a statement before the loop rebinds what the embedding's statements read")
            derived -= writes(st)
    loop_w = writes(loop) - set(assigned_names(loop.target))
    carried: set[str] = set()
    done: set[str] = set()
    for st in loop.body.body:
        carried |= (reads(st) - done) & (loop_w | derived)
        if isinstance(st, cst.SimpleStatementLine):
            done |= writes(st)
    after = set().union(*(reads(s) for s in post)) if post else set()
    carried |= after & (loop_w | derived)
    if not carried or not carried <= derived:
        raise ValueError("the loop carries a value the embedding does not give")
    wide = {"inputs_embeds"}
    for i in first:
        wide = wide_after(pre[i], wide, embed, keeping=keeping)
    for st in loop.body.body:
        pair = _threads_residual(st, residual, layer_var, wide) if residual is not None else set()
        wide = wide_after(st, wide, embed, layer_var, keeping) | pair
    if not carried <= wide:
        raise ValueError(f"cannot show the width of {sorted(carried - wide)}")
    order = [n for i in first for n in sorted(writes(pre[i])) if n in carried]
    order = list(dict.fromkeys(order + sorted(carried)))
    def attrs(stmts: list) -> set[str]:
        return set().union(*(self_calls(s) for s in stmts)) if stmts else set()

    others = attrs([f for f in cls.body.body
                    if isinstance(f, cst.FunctionDef) and f.name.value not in ("__init__", "forward")])
    if layers in others | attrs([*pre, *post]) or embed in others | attrs([loop, *post]):
        raise ValueError("the layer list or the embedding is read outside the stage that holds it")
    last_only = sorted(attrs(post) - attrs([*pre, loop]) - others - {layers, embed})
    return Stages(loop_at=at, layers=layers, first=first, carried=order, last_only=last_only)
