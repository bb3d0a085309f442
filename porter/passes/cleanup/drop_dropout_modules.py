"""PT311 drop-dropout-modules: the rule `DropDropoutModules`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import dotted, findall, self_attr
from porter.passes.base import Example, Rule
from porter.passes.cleanup._reads import attribute_uses, named

_DROPOUT_FN = "torch.nn.functional.dropout"
_DROPOUT_MODULE = "torch.nn.Dropout"
_INFERENCE = m.Attribute(value=m.Name("self"), attr=m.Name("training")) | m.Name("False")
_ATOMIC = (cst.Name, cst.Attribute, cst.Call, cst.Subscript, cst.Integer, cst.Float, cst.SimpleString)

_MODULES = (
    "from torch import nn\n\n\nclass ABlock(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.fc = ColumnParallelLinear(config.hidden_size, config.hidden_size)\n"
    "        self.resid_dropout = nn.Dropout(config.resid_pdrop)\n{kept}\n"
    "    def forward(self, x):\n        return self.fc(x)[0]\n"
)
_HELPER = (
    "import torch.nn.functional as F\nfrom torch import nn\n\n\n"
    "{helper}"
    "class ALayer(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.hidden_dropout = config.hidden_dropout\n\n"
    "    def forward(self, x, residual):\n        h = self.mlp(x)\n{call}"
    "        return out\n"
)
_DROPOUT_ADD = (
    "def dropout_add(x, residual, prob, training):\n    \"\"\"Dropout add function\"\"\"\n"
    "    out = F.dropout(x, p=prob, training=training)\n    out = residual + out\n    return out\n\n\n"
)


class DropDropoutModules(Rule):
    descends = False
    code = "PT311"
    name = "drop-dropout-modules"
    why = (
        "PT012 replaces the dropout calls of the forwards by their input, but leaves what they came from: "
        "the `nn.Dropout` modules `__init__` builds (stateless: no parameter, nothing in the checkpoint), and "
        "the residual dropouts of module helpers (Bloom's and Falcon's `dropout_add(x, residual, prob, "
        "training)`, which runs `F.dropout(x, p=prob, training=training)`). A dropout module nothing reads any "
        "more (no `.X` and no string `\"X\"` in the module) is removed. In a helper whose dropout takes its "
        "`training` from a parameter that every call passes as `self.training` (False in the engine, which "
        "runs the model in eval mode) or `False`, the dropout call is the identity and becomes its input; a "
        "helper left as straight-line arithmetic (`out = residual + x; return out`) is then written into its "
        "calls (`residual + attention_output`, as vLLM's Falcon adds its residual), dropping the arguments it "
        "no longer reads (the dropout probability, the training flag), and PT060 removes the helper."
    )
    examples = [
        Example(_MODULES.format(kept=""), _MODULES.format(kept="").replace(
            "        self.resid_dropout = nn.Dropout(config.resid_pdrop)\n", "")),
        Example(  # must leave unchanged: still called (in a method PT012 did not rewrite)
            _MODULES.format(kept="\n    def extra(self, x):\n        return self.resid_dropout(x)\n"),
            _MODULES.format(kept="\n    def extra(self, x):\n        return self.resid_dropout(x)\n")),
        Example(
            _HELPER.format(helper=_DROPOUT_ADD, call="        out = dropout_add(h, residual, self.hidden_dropout, "
                           "training=self.training)\n"),
            _HELPER.format(helper=_DROPOUT_ADD.replace("F.dropout(x, p=prob, training=training)", "x"),
                           call="        out = residual + h\n"),
        ),
        Example(  # must leave unchanged: a call site trains (the dropout is not the identity there)
            _HELPER.format(helper=_DROPOUT_ADD, call="        out = dropout_add(h, residual, 0.1, True)\n"),
            _HELPER.format(helper=_DROPOUT_ADD, call="        out = dropout_add(h, residual, 0.1, True)\n"),
        ),
    ]

    @classmethod
    def applies(cls, ctx) -> bool:
        return "dropout" in ctx.idx.identifiers or "Dropout" in ctx.idx.identifiers

    def leave_Module(self, original, updated):
        updated = self._helpers(updated)
        return self._modules(updated)

    # -- residual dropout helpers -------------------------------------------------------------
    def _kept_classes(self, module: cst.Module) -> list[cst.ClassDef]:
        return [st for st in module.body if isinstance(st, cst.ClassDef) and self.kept(st.name.value)]

    def _helpers(self, module: cst.Module) -> cst.Module:
        kept = self._kept_classes(module)
        for i, fn in enumerate(module.body):
            if not isinstance(fn, cst.FunctionDef):
                continue
            params = [p.name.value for p in fn.params.params]
            drops = [c for c in findall(fn, m.Call()) if self.ctx.idx.qualify(dotted(c.func)) == _DROPOUT_FN]  # type: ignore[attr-defined]
            flags = {self._training(c) for c in drops}
            if not drops or len(flags) != 1 or (flag := flags.pop()) not in params:
                continue
            calls = [c for cls in kept for c in findall(cls, m.Call(func=m.Name(fn.name.value)))]
            bound = [_bind(c, fn) for c in calls]
            if not calls or any(b is None or not m.matches(b.get(flag, fn.params.params[params.index(flag)].default
                                                              or cst.Name("True")), _INFERENCE) for b in bound):
                continue
            new_fn = fn.visit(_Identity({id(c) for c in drops}))
            self.mark(fn.name.value)
            body = list(module.body)
            body[i] = new_fn
            module = module.with_changes(body=body)
            result = _straight_line(new_fn)
            if result is not None:
                module = module.visit(_Inline(self, new_fn, result))
        return module

    @staticmethod
    def _training(call: cst.Call) -> str | None:
        for k, a in enumerate(call.args):
            if (a.keyword is not None and a.keyword.value == "training") or (a.keyword is None and k == 2):
                return a.value.value if isinstance(a.value, cst.Name) else None
        return None

    # -- dropout modules nothing calls -----------------------------------------------------------
    def _modules(self, module: cst.Module) -> cst.Module:
        uses = attribute_uses(module, self.ctx.idx, set(self.plan.classes))
        strings = named(module, set(self.plan.classes))
        body = list(module.body)
        for i, cls in enumerate(body):
            if not isinstance(cls, cst.ClassDef) or not self.kept(cls.name.value):
                continue
            members = list(cls.body.body)
            for j, fn in enumerate(members):
                if not (isinstance(fn, cst.FunctionDef) and fn.name.value == "__init__"):
                    continue
                stmts = [st for st in fn.body.body if not self._unused_dropout(st, uses, strings)]
                if len(stmts) != len(fn.body.body):
                    members[j] = fn.with_changes(body=fn.body.with_changes(body=stmts or [
                        cst.SimpleStatementLine([cst.Pass()])]))
                    self.mark(f"{cls.name.value}.__init__")
            body[i] = cls.with_changes(body=cls.body.with_changes(body=members))
        return module.with_changes(body=body)

    def _unused_dropout(self, st: cst.BaseStatement, uses: dict[str, int], named: set[str]) -> bool:
        if not m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(
                m.Attribute(value=m.Name("self")))], value=m.Call())])):
            return False
        assign = st.body[0]  # type: ignore[attr-defined]
        attr = self_attr(assign.targets[0].target)
        return self.ctx.idx.qualify(dotted(assign.value.func)) == _DROPOUT_MODULE and uses.get(attr, 0) == 1 \
            and attr not in named


def _bind(call: cst.Call, fn: cst.FunctionDef) -> dict[str, cst.BaseExpression] | None:
    """The call's argument per parameter of `fn` (None when it passes `*`/`**` or an unknown keyword)."""
    params = [p.name.value for p in fn.params.params]
    out: dict[str, cst.BaseExpression] = {}
    for k, a in enumerate(call.args):
        if a.star:
            return None
        if a.keyword is None:
            if k >= len(params):
                return None
            out[params[k]] = a.value
        elif a.keyword.value in params:
            out[a.keyword.value] = a.value
        else:
            return None
    return out


def _straight_line(fn: cst.FunctionDef) -> cst.BaseExpression | None:
    """What `fn` returns as one expression of its parameters, when its body (a docstring aside) only binds
    locals and returns: `out = x; out = residual + out; return out` -> `residual + x`."""
    if isinstance(fn.params.star_arg, cst.Param) or fn.params.kwonly_params or fn.params.star_kwarg or fn.decorators:
        return None
    env: dict[str, cst.BaseExpression] = {}
    body = list(fn.body.body)
    if body and m.matches(body[0], m.SimpleStatementLine(body=[m.Expr(m.SimpleString())])):
        body = body[1:]
    for k, st in enumerate(body):
        if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())])])):
            a = st.body[0]  # type: ignore[attr-defined]
            env[a.targets[0].target.value] = _substitute(a.value, env)
        elif k == len(body) - 1 and m.matches(st, m.SimpleStatementLine(body=[m.Return(value=m.DoNotCare())])) \
                and st.body[0].value is not None:  # type: ignore[attr-defined]
            return _substitute(st.body[0].value, env)  # type: ignore[attr-defined]
        else:
            return None
    return None


def _substitute(node: cst.BaseExpression, env: dict[str, cst.BaseExpression]) -> cst.BaseExpression:
    return node.visit(_Replace(env))  # type: ignore[return-value]


def _paren(node: cst.BaseExpression) -> cst.BaseExpression:
    if isinstance(node, _ATOMIC) or node.lpar:
        return node
    return node.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()])


class _Replace(cst.CSTTransformer):
    """Names read in an expression replaced by expressions (parenthesised where they are compound)."""

    def __init__(self, env: dict[str, cst.BaseExpression]) -> None:
        super().__init__()
        self.env = env

    def leave_Name(self, original, updated):
        return _paren(self.env[original.value]) if original.value in self.env else updated

    def leave_Attribute(self, original, updated):  # an attribute's name is not a read
        return updated.with_changes(attr=original.attr)

    def leave_Arg(self, original, updated):  # nor is a keyword's
        return updated.with_changes(keyword=original.keyword)


class _Identity(cst.CSTTransformer):
    """The given dropout calls replaced by their input."""

    def __init__(self, ids: set[int]) -> None:
        super().__init__()
        self.ids = ids

    def leave_Call(self, original, updated):
        return updated.args[0].value if id(original) in self.ids else updated


class _Inline(cst.CSTTransformer):
    """The kept classes' calls of a straight-line helper replaced by what it returns, its parameters bound to
    the call's arguments (an argument it no longer reads must be free of effects; one it reads twice must
    be a name or an attribute)."""

    def __init__(self, rule: DropDropoutModules, fn: cst.FunctionDef, result: cst.BaseExpression) -> None:
        super().__init__()
        self.rule, self.fn, self.result = rule, fn, result
        self.reads = [n.value for n in findall(result, m.Name())]  # type: ignore[attr-defined]
        self.params = {p.name.value for p in fn.params.params}
        self.scope: list[str] = []
        self.made: set[int] = set()

    def visit_ClassDef(self, node):
        self.scope.append(node.name.value)
        return self.rule.kept(node.name.value)

    def leave_ClassDef(self, original, updated):
        self.scope.pop()
        return updated

    def visit_FunctionDef(self, node):
        return bool(self.scope)

    def leave_Call(self, original, updated):
        if not m.matches(updated.func, m.Name(self.fn.name.value)):
            return updated
        bound = _bind(updated, self.fn)
        if bound is None:
            return updated
        for p in self.fn.params.params:
            if p.name.value not in bound and p.default is not None:
                bound[p.name.value] = p.default
        read = {n for n in self.reads if n in self.params}
        if not read <= set(bound):
            return updated
        for name, value in bound.items():
            if name not in read and (findall(value, m.Call()) or findall(value, m.NamedExpr())):
                return updated
            if self.reads.count(name) > 1 and not isinstance(value, (cst.Name, cst.Attribute)):
                return updated
        self.rule.mark(".".join(self.scope))
        out = _paren(_substitute(self.result, {k: v for k, v in bound.items() if k in read}))
        self.made.add(id(out))
        return out

    def _bare(self, value: cst.BaseExpression) -> cst.BaseExpression:
        if id(value) in self.made and value.lpar:
            return value.with_changes(lpar=[], rpar=[])
        return value

    def leave_Assign(self, original, updated):
        return updated.with_changes(value=self._bare(updated.value))

    def leave_Return(self, original, updated):
        return updated if updated.value is None else updated.with_changes(value=self._bare(updated.value))

