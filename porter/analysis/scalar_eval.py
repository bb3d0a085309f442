"""Numbers computed by a few lines of source, read statically (nothing imported or executed).

A small interpreter over libcst expressions: literals, names bound in an environment (`self.X` as
"self.X"), arithmetic, comparisons, `x if c else y`, `and`/`or`/`not`, and the pure functions
`math.log/ceil/floor/sqrt/exp`, `max`, `min`, `abs`, `int`, `float`. Anything else raises
`Unknown`. Rules use it to show that a value a model computes from a length is a constant over a
range of lengths (porter/passes/rope/trained_length_identity.py).
"""

from __future__ import annotations

import math
import operator

import libcst as cst

from porter.analysis.cstutil import dotted


class Unknown(Exception):
    """An expression this interpreter does not model."""


_BIN = {cst.Add: operator.add, cst.Subtract: operator.sub, cst.Multiply: operator.mul, cst.Divide: operator.truediv,
        cst.FloorDivide: operator.floordiv, cst.Power: operator.pow, cst.Modulo: operator.mod}
_CMP = {cst.GreaterThan: operator.gt, cst.GreaterThanEqual: operator.ge, cst.LessThan: operator.lt,
        cst.LessThanEqual: operator.le, cst.Equal: operator.eq, cst.NotEqual: operator.ne}
_FUNCS = {"math.log": math.log, "math.ceil": math.ceil, "math.floor": math.floor, "math.sqrt": math.sqrt,
          "math.exp": math.exp, "max": max, "min": min, "abs": abs, "int": int, "float": float}


def value_of(e: cst.BaseExpression, env: dict[str, float]) -> float:
    """E's value with ENV's names; `Unknown` for what is not modelled."""
    if isinstance(e, cst.Integer):
        return int(e.value)
    if isinstance(e, cst.Float):
        return float(e.value)
    if isinstance(e, (cst.Name, cst.Attribute)):
        name = dotted(e)
        if name is None or name not in env:
            raise Unknown(name)
        return env[name]
    if isinstance(e, cst.UnaryOperation):
        v = value_of(e.expression, env)
        if isinstance(e.operator, cst.Minus):
            return -v
        if isinstance(e.operator, cst.Not):
            return not v
        raise Unknown("unary")
    if isinstance(e, cst.BinaryOperation):
        op = _BIN.get(type(e.operator))
        if op is None:
            raise Unknown("operator")
        return op(value_of(e.left, env), value_of(e.right, env))
    if isinstance(e, cst.BooleanOperation):
        left = value_of(e.left, env)
        if isinstance(e.operator, cst.And):
            return value_of(e.right, env) if left else left
        return left if left else value_of(e.right, env)
    if isinstance(e, cst.Comparison):
        left = value_of(e.left, env)
        for c in e.comparisons:
            op = _CMP.get(type(c.operator))
            if op is None:
                raise Unknown("comparison")
            right = value_of(c.comparator, env)
            if not op(left, right):
                return False
            left = right
        return True
    if isinstance(e, cst.IfExp):
        return value_of(e.body, env) if value_of(e.test, env) else value_of(e.orelse, env)
    if isinstance(e, cst.Call):
        fn = _FUNCS.get(dotted(e.func) or "")
        if fn is None or any(a.keyword is not None or a.star for a in e.args):
            raise Unknown(dotted(e.func))
        try:
            return fn(*(value_of(a.value, env) for a in e.args))
        except (ValueError, ZeroDivisionError, OverflowError) as exc:
            raise Unknown(str(exc)) from None
    raise Unknown(type(e).__name__)


def run_assigns(stmts: list[cst.BaseStatement], env: dict[str, float]) -> dict[str, float]:
    """ENV after the plain assignments STMTS (`x = e`, `self.x = e`); `Unknown` for any other statement."""
    env = dict(env)
    for st in stmts:
        if not (isinstance(st, cst.SimpleStatementLine) and len(st.body) == 1 and isinstance(st.body[0], cst.Assign)
                and len(st.body[0].targets) == 1):
            raise Unknown("statement")
        target = dotted(st.body[0].targets[0].target)
        if target is None:
            raise Unknown("target")
        env[target] = value_of(st.body[0].value, env)
    return env
