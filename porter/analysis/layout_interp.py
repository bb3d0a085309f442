"""Runs a method's statements over sample sizes (porter/analysis/symeval.py holds the values and
the tensor operations): expressions of ints, tuples, `self.`/`config.` attributes, the fused
projection's output as an index array, calls of the class's own methods. A statement that cannot
be evaluated forgets what it binds (its names become unknown); an `if` whose test cannot be
evaluated forgets what either arm binds."""

from __future__ import annotations

import functools

import math
from collections.abc import Callable

import libcst as cst
import numpy as np

from porter.analysis.cstutil import assigned_names, dotted, param_names, walk
from porter.analysis.symeval import (
    Frame, Obj, Opaque, Unknown, binop, compare, einops_rearrange, is_tensor_method, is_torch_call, subscript,
    tensor_method, torch_function,
)

MAX_DEPTH = 4
_BINDERS = (cst.AssignTarget, cst.AugAssign, cst.AnnAssign, cst.For)  # the nodes whose target binds


@functools.lru_cache(maxsize=8192)
def bound_in(node: cst.CSTNode) -> frozenset[str]:
    """Every name an assignment anywhere inside NODE binds (cached by node: nodes compare and hash by
    identity, and the interpreters ask of one statement again and again)."""
    out: set[str] = set()
    for n in walk(node):
        if type(n) in _BINDERS:
            out.update(assigned_names(n.target))  # type: ignore[attr-defined]
    return frozenset(out)


class Interp:
    """SELF_GET(name) reads `self.name`; FUSED(attr) is the output of `self.attr(...)` when attr is
    the fused projection (else None); METHODS are the class's own methods, run when called."""

    def __init__(self, self_get: Callable[[str], object], fused: Callable[[str], object | None],
                 methods: dict[str, cst.FunctionDef]) -> None:
        self.self_obj = Obj(self_get)
        self.fused = fused
        self.methods = methods
        self.called: list[str] = []  # methods run with a tracked argument
        self.depth = 0
        self.set_self_attr: Callable[[str, object], None] | None = None

    # -- expressions ------------------------------------------------------------------------------
    def expr(self, e: cst.BaseExpression, env: dict):  # noqa: C901 (one dispatch on node type)
        if isinstance(e, cst.Integer):
            return int(e.evaluated_value)
        if isinstance(e, cst.Float):
            return float(e.evaluated_value)
        if isinstance(e, cst.Name):
            if e.value in ("None", "True", "False"):
                return {"None": None, "True": True, "False": False}[e.value]
            if e.value == "self":
                return self.self_obj
            if e.value not in env:
                raise Unknown(e.value)
            return env[e.value]
        if isinstance(e, cst.Ellipsis):
            return Ellipsis
        if isinstance(e, cst.SimpleString):
            return e.evaluated_value  # an einops pattern
        if isinstance(e, cst.Attribute):
            return self._attribute(self.expr(e.value, env), e.attr.value)
        if isinstance(e, cst.Subscript):
            return subscript(self.expr(e.value, env), tuple(self._index(el.slice, env) for el in e.slice))
        if isinstance(e, cst.BinaryOperation):
            return binop(e.operator, self.expr(e.left, env), self.expr(e.right, env))
        if isinstance(e, cst.UnaryOperation):
            return self._unary(e, env)
        if isinstance(e, cst.BooleanOperation):
            left = self.truth(self.expr(e.left, env))
            if isinstance(e.operator, cst.And):
                return left and self.truth(self.expr(e.right, env))
            return left or self.truth(self.expr(e.right, env))
        if isinstance(e, cst.Comparison):
            left = self.expr(e.left, env)
            for c in e.comparisons:
                right = self.expr(c.comparator, env)
                if not compare(c.operator, left, right):
                    return False
                left = right
            return True
        if isinstance(e, cst.IfExp):
            return self.expr(e.body if self.truth(self.expr(e.test, env)) else e.orelse, env)
        if isinstance(e, (cst.Tuple, cst.List)):
            out: list = []
            for el in e.elements:
                v = self.expr(el.value, env)
                if isinstance(el, cst.StarredElement):
                    if not isinstance(v, tuple):
                        raise Unknown("starred non-tuple")
                    out.extend(v)
                else:
                    out.append(v)
            return tuple(out)
        if isinstance(e, (cst.ListComp, cst.GeneratorExp)):
            return self._comprehension(e, env)
        if isinstance(e, cst.Call):
            return self.call(e, env)
        raise Unknown(type(e).__name__)

    def _attribute(self, base, name: str):
        if isinstance(base, Obj):
            return base.get(name)  # type: ignore[operator]
        if isinstance(base, (np.ndarray, Opaque)):
            shape = base.shape if isinstance(base, Opaque) else tuple(base.shape)
            if name == "shape":
                return shape
            if name == "ndim":
                return len(shape)
        raise Unknown(f".{name}")

    def _index(self, sl: cst.BaseSlice, env: dict):
        if isinstance(sl, cst.Slice):
            parts = [None if p is None else self.expr(p, env) for p in (sl.lower, sl.upper, sl.step)]
            return slice(*parts)
        v = self.expr(sl.value, env)  # type: ignore[attr-defined]
        return list(v) if isinstance(v, tuple) else v

    def _unary(self, e: cst.UnaryOperation, env: dict):
        v = self.expr(e.expression, env)
        if isinstance(e.operator, cst.Not):
            return not self.truth(v)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise Unknown("unary on a non-number")
        return -v if isinstance(e.operator, cst.Minus) else v

    def _comprehension(self, e, env: dict) -> tuple:
        if e.for_in.inner_for_in is not None or e.for_in.ifs or not isinstance(e.for_in.target, cst.Name):
            raise Unknown("comprehension")
        items = self.expr(e.for_in.iter, env)
        if not isinstance(items, tuple):
            raise Unknown("comprehension over a non-tuple")
        var = e.for_in.target.value
        return tuple(self.expr(e.elt, {**env, var: item}) for item in items)

    @staticmethod
    def truth(v) -> bool:
        if v is None or isinstance(v, (bool, int, float)):
            return bool(v)
        raise Unknown("truth of a tensor or object")

    def _args(self, call: cst.Call, env: dict) -> tuple[list, dict]:
        args: list = []
        kw: dict = {}
        for a in call.args:
            v = self.expr(a.value, env)
            if a.keyword is not None:
                kw[a.keyword.value] = v
            elif a.star == "*":
                if not isinstance(v, tuple):
                    raise Unknown("*args of a non-tuple")
                args.extend(v)
            elif a.star:
                raise Unknown("**kwargs")
            else:
                args.append(v)
        return args, kw

    def call(self, c: cst.Call, env: dict):
        f = c.func
        if isinstance(f, cst.Attribute) and isinstance(f.value, cst.Name) and f.value.value == "self":
            out = self.fused(f.attr.value)
            if out is not None:
                return out
            if f.attr.value in self.methods:
                args, kw = self._args(c, env)
                return self.run_method(f.attr.value, args, kw)
            raise Unknown(f"self.{f.attr.value}()")
        if (name := is_torch_call(f)) is not None:
            args, kw = self._args(c, env)
            return torch_function(name, args, kw)
        if isinstance(f, cst.Attribute) and is_tensor_method(f.attr.value):
            base = self.expr(f.value, env)
            args, kw = self._args(c, env)
            return tensor_method(base, f.attr.value, args, kw)
        if dotted(f) in ("rearrange", "einops.rearrange"):  # InternLM2's grouped split, in einops
            args, kw = self._args(c, env)
            if len(args) != 2:
                raise Unknown("rearrange")
            return einops_rearrange(args[0], args[1], kw)
        if dotted(f) == "math.sqrt":
            args, _ = self._args(c, env)
            if len(args) != 1 or not isinstance(args[0], (int, float)) or args[0] < 0:
                raise Unknown("math.sqrt")
            return math.sqrt(args[0])
        if isinstance(f, cst.Name) and f.value in ("len", "tuple", "list", "int"):
            args, _ = self._args(c, env)
            if len(args) != 1:
                raise Unknown(f.value)
            fn = {"len": len, "tuple": tuple, "list": tuple, "int": int}[f.value]
            try:
                return fn(args[0])
            except TypeError:
                raise Unknown(f.value) from None
        raise Unknown("call")

    def run_method(self, name: str, args: list, kw: dict):
        if self.depth >= MAX_DEPTH:
            raise Unknown("call depth")
        fn = self.methods[name]
        params = param_names(fn)[1:]
        if len(args) > len(params):
            raise Unknown("method signature")
        env = dict(zip(params, args))
        env.update({k: v for k, v in kw.items() if k in params})
        if any(isinstance(a, np.ndarray) for a in [*args, *kw.values()]):
            self.called.append(name)
        self.depth += 1
        try:
            frame = Frame(env)
            self.block(fn.body.body, frame)  # type: ignore[attr-defined]
        finally:
            self.depth -= 1
        if not frame.done or isinstance(frame.returned, Unknown):
            raise Unknown(f"{name} returned nothing known")
        return frame.returned

    # -- statements -------------------------------------------------------------------------------
    def block(self, stmts, frame: Frame, trace: list | None = None) -> None:
        for st in stmts:
            if frame.done:
                return
            self.statement(st, frame)
            if trace is not None:
                trace.append(dict(frame.env))

    def _forget(self, node: cst.CSTNode, frame: Frame) -> None:
        for n in bound_in(node):
            frame.env.pop(n, None)

    def statement(self, st: cst.CSTNode, frame: Frame) -> None:
        if isinstance(st, cst.SimpleStatementLine):
            for small in st.body:
                self._small(small, frame)
                if frame.done:
                    return
            return
        if isinstance(st, cst.If):
            try:
                arm = self.truth(self.expr(st.test, frame.env))
            except Unknown:
                self._forget(st, frame)
                return
            if arm:
                self.block(st.body.body, frame)
            elif isinstance(st.orelse, cst.If):
                self.statement(st.orelse, frame)
            elif isinstance(st.orelse, cst.Else):
                self.block(st.orelse.body.body, frame)
            return
        if isinstance(st, (cst.FunctionDef, cst.ClassDef)):
            return
        self._forget(st, frame)

    def _small(self, small: cst.BaseSmallStatement, frame: Frame) -> None:
        env = frame.env
        if isinstance(small, cst.Return):
            try:
                frame.returned = None if small.value is None else self.expr(small.value, env)
            except Unknown as exc:
                frame.returned = exc
            frame.done = True
            return
        if isinstance(small, (cst.Assign, cst.AnnAssign, cst.AugAssign)):
            value_node = small.value
            try:
                if value_node is None:
                    return
                value = self.expr(value_node, env)
                if isinstance(small, cst.AugAssign):
                    value = binop(_AUG[type(small.operator)], self.expr(small.target, env), value)
            except (Unknown, KeyError):
                self._forget(small, frame)
                for t in _targets(small):
                    if isinstance(t, cst.Attribute) and self.set_self_attr is not None and _is_self(t):
                        self.set_self_attr(t.attr.value, Unknown())
                return
            for t in _targets(small):
                self._bind(t, value, frame)
            return
        # expressions (docstrings, super().__init__()), raise, assert, pass: nothing bound

    def _bind(self, target: cst.BaseExpression, value, frame: Frame) -> None:
        if isinstance(target, cst.Name):
            frame.env[target.value] = value
            return
        if isinstance(target, (cst.Tuple, cst.List)):
            names = [el.value for el in target.elements]
            if not isinstance(value, tuple) or len(value) != len(names) or any(
                    isinstance(el, cst.StarredElement) for el in target.elements):
                self._forget(target, frame)
                for n in names:
                    if isinstance(n, cst.Name):
                        frame.env.pop(n.value, None)
                return
            for n, v in zip(names, value):
                self._bind(n, v, frame)
            return
        if isinstance(target, cst.Attribute) and _is_self(target) and self.set_self_attr is not None:
            self.set_self_attr(target.attr.value, value)


_AUG = {cst.AddAssign: cst.Add(), cst.SubtractAssign: cst.Subtract(), cst.MultiplyAssign: cst.Multiply(),
        cst.FloorDivideAssign: cst.FloorDivide()}


def _targets(small) -> list[cst.BaseExpression]:
    if isinstance(small, cst.Assign):
        return [t.target for t in small.targets]
    return [small.target]


def _is_self(node: cst.Attribute) -> bool:
    return isinstance(node.value, cst.Name) and node.value.value == "self"
