"""PT332 one-all-reduce: the rule `OneAllReduce`; its `why` says what it rewrites and why."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, find_method, findall, names_in, param_names, self_attr
from porter.passes.base import Example, Rule

_FILE = (
    "import torch\nfrom torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
    "        super().__init__()\n        self.dense = RowParallelLinear(config.hidden_size, config.hidden_size{r})\n\n"
    "    def forward(self, x):\n        x = self.attn(x)\n        x, _ = self.dense(x)\n        return x\n\n\n"
    "class MLP(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.down = RowParallelLinear(4 * config.hidden_size, config.hidden_size{r})\n\n"
    "    def forward(self, x):\n        x, _ = self.down(self.act(self.up(x)[0]))\n        return x\n\n\n"
    "class Layer(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n        self.config = config\n"
    "        self.attention = Attn(config)\n        self.mlp = MLP(config)\n\n"
    "    def forward(self, hidden_states):\n        residual = hidden_states\n"
    "        attention_output = self.attention(self.ln(hidden_states))\n"
    "        if not self.config.parallel_attn:\n            residual = residual + attention_output\n"
    "            mlp_input = self.post_ln(residual)\n        else:\n            mlp_input = self.ln(hidden_states)\n"
    "        mlp_output = self.mlp(mlp_input)\n        if self.config.parallel_attn:\n"
    "            mlp_output += attention_output\n{reduce}        return residual + mlp_output\n"
)
_BEFORE = _FILE.format(r="", reduce="")
_AFTER = _FILE.format(
    r=", reduce_results=not (config.parallel_attn), skip_bias_add=config.parallel_attn",
    reduce="            mlp_output = tensor_model_parallel_all_reduce(mlp_output)\n"
    "            if self.attention.dense.bias is not None:\n"
    "                mlp_output = mlp_output + self.attention.dense.bias\n"
    "            if self.mlp.down.bias is not None:\n                mlp_output = mlp_output + self.mlp.down.bias\n")
# the attention's output is read where the sum may happen too: it must be reduced there, unchanged
_READ = _BEFORE.replace("        return residual + mlp_output\n", "        return residual + mlp_output + attention_output\n")
# the attention's output under a second name first (transformers 4.45's Falcon): the same value
_ALIAS = "        attn_outputs = self.attention(self.ln(hidden_states))\n        attention_output = attn_outputs\n"
_ALIASED = (_BEFORE.replace("        attention_output = self.attention(self.ln(hidden_states))\n", _ALIAS),
            _AFTER.replace("        attention_output = self.attention(self.ln(hidden_states))\n", _ALIAS))
# ... and the sum's other name read after it holds the unreduced sum: unchanged
_SUM_ALIAS = _BEFORE.replace("        mlp_output = self.mlp(mlp_input)\n",
                             "        mlp_out = self.mlp(mlp_input)\n        mlp_output = mlp_out\n").replace(
    "        return residual + mlp_output\n", "        return residual + mlp_out\n")
_SEED = {"engine_symbols": {"RowParallelLinear"}}


@dataclass
class _Sum:
    """A decoder layer whose forward adds two blocks' outputs, each a row-parallel projection's."""

    layer: str
    total: str  # the local the sum is kept in (the second block's output)
    stmt: cst.SimpleStatementLine  # `total += part` (or `total = total + part`)
    cond: cst.BaseExpression | None  # when the sum happens (None: always), over self.config reads
    blocks: list[tuple[str, str]]  # (the block's class, its __init__'s config parameter)
    attrs: list[str]  # the layer's attribute holding each block


def _paths(body, path=()):
    """(statement, its path: the if-tests leading to it, each with the branch taken) in order."""
    for st in body:
        if isinstance(st, cst.If):
            yield st, path  # (the test is read on the path to the if)
            yield from _paths(st.body.body, (*path, (st.test, True)))
            other = st.orelse
            if isinstance(other, cst.If):
                yield from _paths([other], (*path, (st.test, False)))
            elif other is not None:
                yield from _paths(other.body.body, (*path, (st.test, False)))
        else:
            yield st, path


def _config_reads(expr: cst.BaseExpression) -> bool:
    """Only `self.config.<attr>` reads, literals, comparisons and boolean operators."""
    if m.matches(expr, m.Attribute(value=m.Attribute(value=m.Name("self"), attr=m.Name("config")))):
        return True
    if isinstance(expr, (cst.Integer, cst.Float, cst.SimpleString)) or m.matches(expr, m.Name("None") | m.Name("True") | m.Name("False")):
        return True
    if isinstance(expr, cst.BooleanOperation):
        return _config_reads(expr.left) and _config_reads(expr.right)
    if isinstance(expr, cst.UnaryOperation) and isinstance(expr.operator, cst.Not):
        return _config_reads(expr.expression)
    if isinstance(expr, cst.Comparison):
        return _config_reads(expr.left) and all(_config_reads(c.comparator) for c in expr.comparisons)
    return False


def _atoms(expr: cst.BaseExpression, out: list[str]) -> None:
    if isinstance(expr, cst.BooleanOperation):
        _atoms(expr.left, out)
        _atoms(expr.right, out)
    elif isinstance(expr, cst.UnaryOperation) and isinstance(expr.operator, cst.Not):
        _atoms(expr.expression, out)
    elif code(expr) not in out:
        out.append(code(expr))


def _holds(expr: cst.BaseExpression, env: dict[str, bool]) -> bool:
    if isinstance(expr, cst.BooleanOperation):
        left = _holds(expr.left, env)
        return (left and _holds(expr.right, env)) if isinstance(expr.operator, cst.And) else (left or _holds(expr.right, env))
    if isinstance(expr, cst.UnaryOperation) and isinstance(expr.operator, cst.Not):
        return not _holds(expr.expression, env)
    return env[code(expr)]


def _exclusive(a, b) -> bool:
    """No setting of the config reads makes both paths true (each atom a free boolean: atoms that
    read the same attribute are not related, so this can only answer False too often)."""
    tests = [t for t, _ in (*a, *b)]
    atoms: list[str] = []
    for t in tests:
        if not _config_reads(t):
            return False
        _atoms(t, atoms)
    if len(atoms) > 12:
        return False
    for values in itertools.product((False, True), repeat=len(atoms)):
        env = dict(zip(atoms, values, strict=True))
        if all(_holds(t, env) == taken for t, taken in (*a, *b)):
            return False
    return True


def _row_output(cls: cst.ClassDef, rows: set[str]) -> str | None:
    """The row-parallel projection whose output the forward returns as it is."""
    fwd = find_method(cls, "forward")
    if fwd is None or not isinstance(fwd.body, cst.IndentedBlock) or len(findall(fwd, m.Return())) != 1:
        return None
    body = list(fwd.body.body)
    call = m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(m.MatchIfTrue(lambda a: a in rows))))
    last = body[-1] if body else None
    if m.matches(last, m.SimpleStatementLine(body=[m.Return(m.Subscript(value=call, slice=[m.SubscriptElement(m.Index(m.Integer("0")))]))])):
        return last.body[0].value.value.func.attr.value  # type: ignore[union-attr]
    if len(body) < 2 or not m.matches(last, m.SimpleStatementLine(body=[m.Return(m.Name())])):
        return None
    out = last.body[0].value.value  # type: ignore[union-attr]
    before = body[-2]
    got = m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Tuple([m.Element(m.Name(out)), m.Element(m.Name("_"))]))], value=call)
                                       | m.Assign(targets=[m.AssignTarget(m.Name(out))], value=m.Subscript(
                                           value=call, slice=[m.SubscriptElement(m.Index(m.Integer("0")))]))])
    return before.body[0].value.func.attr.value if m.matches(before, got) else None  # type: ignore[attr-defined]


class OneAllReduce(Rule):
    descend_methods = frozenset()  # works on the module as a whole
    code = "PT332"
    name = "one-all-reduce"
    why = (
        "A parallel residual block (Falcon's attention and MLP reading the same input) adds the two "
        "blocks' outputs before the residual. Each ends in a row-parallel projection that all-reduces "
        "its partial sums across tensor-parallel ranks; the engine's own Falcon builds both with "
        "`reduce_results=False` where the blocks are parallel and all-reduces their sum once: one "
        "collective per layer instead of two. The engine refuses an unreduced projection that adds "
        "its bias (each rank would add it), so both skip it (`skip_bias_add`) and the layer adds "
        "the two biases, where there are any, after the reduce. Found by dataflow: a layer whose "
        "forward adds the output of one sub-module to another's (`total += part`), each sub-module "
        "built once, in this layer, and returning its row-parallel projection's output as it is; where "
        "the add sits under a condition on the config, both projections take `reduce_results=not "
        "(condition)` and the sum is reduced under the same condition. Every other read of the two "
        "outputs must be on a path the condition excludes (checked over every setting of the config "
        "reads), or the block stays as it was."
    )
    examples = [
        Example(_BEFORE, _AFTER, seed=_SEED),
        Example(_READ, _READ, seed=_SEED),
        Example(*_ALIASED, seed=_SEED),
        Example(_SUM_ALIAS, _SUM_ALIAS, seed=_SEED),
    ]

    @classmethod
    def applies(cls, ctx) -> bool:
        return "RowParallelLinear" in ctx.engine_symbols

    def leave_Module(self, original, updated):
        row = self.ctx.bound_name("RowParallelLinear")
        classes = {st.name.value: st for st in updated.body if isinstance(st, cst.ClassDef)}
        rows = {name: _row_output(cls, _row_attrs(cls, row)) for name, cls in classes.items()}
        sums = [s for name, cls in classes.items() if (s := self._sum(name, cls, classes, rows, updated)) is not None]
        if not sums:
            return updated
        reduce = self.ctx.use("tensor_model_parallel_all_reduce")
        body = []
        for st in updated.body:
            if isinstance(st, cst.ClassDef):
                for s in sums:
                    for block, config in s.blocks:
                        if st.name.value == block:
                            st = self._unreduced(st, rows[block], row, s.cond, config)
                    if st.name.value == s.layer:
                        lines = [cst.parse_statement(f"{s.total} = {reduce}({s.total})\n")]
                        for attr, (block, _) in zip(s.attrs, s.blocks, strict=True):
                            bias = f"self.{attr}.{rows[block]}.bias"  # skipped in the block, added once here
                            lines.append(cst.parse_statement(
                                f"if {bias} is not None:\n    {s.total} = {s.total} + {bias}\n"))
                        st = st.deep_replace(s.stmt, cst.FlattenSentinel([s.stmt, *lines]))  # type: ignore[assignment]
                        self.mark(f"{s.layer}.forward")
            body.append(st)
        return updated.with_changes(body=body)

    def _unreduced(self, cls: cst.ClassDef, attr: str, row: str, cond, config: str) -> cst.ClassDef:
        init = find_method(cls, "__init__")
        build = next(a for a in findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(
            value=m.Name("self"), attr=m.Name(attr)))], value=m.Call(func=m.Name(row)))))  # type: ignore[arg-type]
        call = build.value  # type: ignore[attr-defined]
        if cond is None:
            reduce: cst.BaseExpression = cst.Name("False")
            skip: cst.BaseExpression = cst.Name("True")
        else:
            skip = cond.visit(_ConfigTo(config))  # type: ignore[assignment]
            reduce = cst.parse_expression("not (" + code(skip) + ")")
        eq = cst.AssignEqual(whitespace_before=cst.SimpleWhitespace(""), whitespace_after=cst.SimpleWhitespace(""))
        comma = cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
        args = [*call.args[:-1], call.args[-1].with_changes(comma=comma)] if call.args else []
        # the engine refuses an unreduced projection that adds its bias: the layer adds it after the reduce
        args += [cst.Arg(reduce, keyword=cst.Name("reduce_results"), equal=eq, comma=comma),
                 cst.Arg(skip, keyword=cst.Name("skip_bias_add"), equal=eq)]
        self.mark(f"{cls.name.value}.__init__")
        return cls.deep_replace(call, call.with_changes(args=args))  # type: ignore[return-value]

    def _sum(self, name, cls, classes, rows, module) -> _Sum | None:
        fwd, init = find_method(cls, "forward"), find_method(cls, "__init__")
        if fwd is None or init is None or not isinstance(fwd.body, cst.IndentedBlock):
            return None
        init_params = param_names(init)
        config = next((a.value.value for a in findall(init, m.Assign(  # type: ignore[attr-defined]
            targets=[m.AssignTarget(m.Attribute(value=m.Name("self"), attr=m.Name("config")))], value=m.Name()))), None)
        if config not in init_params:
            return None
        built: dict[str, str] = {}  # attribute -> the file class it is built of, with the layer's config first
        for a in findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))], value=m.Call(func=m.Name()))):
            cls_name = a.value.func.value  # type: ignore[attr-defined]
            args = a.value.args  # type: ignore[attr-defined]
            if cls_name in classes and rows.get(cls_name) and args and args[0].keyword is None \
                    and m.matches(args[0].value, m.Name(config)):
                built[self_attr(a.targets[0].target)] = cls_name  # type: ignore[attr-defined,index]
        outputs: dict[str, str] = {}  # local -> the block class whose output it holds
        names: dict[str, set[str]] = {}  # local -> every local holding the same output (its aliases)
        stmts = list(_paths(fwd.body.body))
        defs: set[int] = set()  # the statements that define the outputs and their aliases
        for k, (st, path) in enumerate(stmts):
            hit = m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())], value=m.Call(
                func=m.Attribute(value=m.Name("self"), attr=m.Name(m.MatchIfTrue(lambda x: x in built)))))])
            alias = m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())], value=m.Name(
                m.MatchIfTrue(lambda x: x in outputs)))])
            if not path and m.matches(st, hit):
                local = st.body[0].targets[0].target.value  # type: ignore[attr-defined]
                outputs[local] = built[st.body[0].value.func.attr.value]  # type: ignore[attr-defined]
                names[local] = {local}
                defs.add(k)
            elif not path and m.matches(st, alias):  # `attention_output = attn_outputs`: the same value
                local, source = st.body[0].targets[0].target.value, st.body[0].value.value  # type: ignore[attr-defined]
                outputs[local] = outputs[source]
                names[source].add(local)
                names[local] = names[source]
                defs.add(k)
        for i, (st, path) in enumerate(stmts):
            pair = _added(st, set(outputs))
            if pair is None:
                continue
            total, part = pair
            blocks = [outputs[part], outputs[total]]
            if blocks[0] == blocks[1] or any(len(findall(module, m.Call(func=m.Name(b)))) != 1 for b in blocks):
                return None
            if not all(_config_reads(t) for t, _ in path) or not self._others_excluded(stmts, i, path, defs, total, names[total], names[part]):
                return None
            cond = _conjunction(path)
            params = [param_names(find_method(classes[b], "__init__")) for b in blocks]  # type: ignore[arg-type]
            if any(len(p) < 2 for p in params):
                return None
            attrs = [next(a for a, c in built.items() if c == b) for b in blocks]
            return _Sum(name, total, st, cond, [(b, p[1]) for b, p in zip(blocks, params, strict=True)], attrs)
        return None

    @staticmethod
    def _others_excluded(stmts, i, path, defs: set[int], name: str, total: set[str], part: set[str]) -> bool:
        """Every other read of the two outputs (under any of their names) is on a path the sum's
        condition excludes: the part is unreduced wherever the sum happens, the total until the sum
        (under `name`, which the reduce rebinds; its aliases hold the unreduced sum after it)."""
        for j, (st, other) in enumerate(stmts):
            if j == i or j in defs:
                continue
            read = names_in(st.test if isinstance(st, cst.If) else st)
            if isinstance(st, (cst.For, cst.While, cst.With, cst.Try, cst.FunctionDef)) and (read & (total | part)):
                return False
            if ((read & part) or ((read & total) and j < i) or (read & (total - {name}))) and not _exclusive(other, path):
                return False
        return True


def _row_attrs(cls: cst.ClassDef, row: str) -> set[str]:
    init = find_method(cls, "__init__")
    found = findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))],
                                   value=m.Call(func=m.Name(row)))) if init else []
    attrs = {self_attr(a.targets[0].target) for a in found}  # type: ignore[attr-defined]
    return {a for a in attrs if a} if not any(m.matches(arg.keyword, m.Name("reduce_results") | m.Name("skip_bias_add"))
                                              for a in found for arg in a.value.args) else set()  # type: ignore[attr-defined]


def _added(st, outputs: set[str]) -> tuple[str, str] | None:
    """`total += part` or `total = total + part` / `part + total`, both block outputs."""
    if not isinstance(st, cst.SimpleStatementLine) or len(st.body) != 1:
        return None
    node = st.body[0]
    if m.matches(node, m.AugAssign(target=m.Name(), operator=m.AddAssign(), value=m.Name())):
        pair = (node.target.value, node.value.value)  # type: ignore[attr-defined]
    elif m.matches(node, m.Assign(targets=[m.AssignTarget(m.Name())], value=m.BinaryOperation(
            left=m.Name(), operator=m.Add(), right=m.Name()))):
        total = node.targets[0].target.value  # type: ignore[attr-defined]
        left, right = node.value.left.value, node.value.right.value  # type: ignore[attr-defined]
        pair = (total, right if left == total else left) if total in (left, right) else ("", "")
    else:
        return None
    return pair if set(pair) <= outputs and pair[0] != pair[1] else None


def _conjunction(path) -> cst.BaseExpression | None:
    parts = [code(t) if taken else f"not ({code(t)})" for t, taken in path]
    return cst.parse_expression(" and ".join(f"({p})" if len(path) > 1 else p for p in parts)) if parts else None


class _ConfigTo(cst.CSTTransformer):
    """`self.config.x` -> `<config>.x` (the block's __init__ reads its own config parameter)."""

    def __init__(self, config: str) -> None:
        super().__init__()
        self.config = config

    def leave_Attribute(self, original, updated):
        if m.matches(updated, m.Attribute(value=m.Name("self"), attr=m.Name("config"))):
            return cst.Name(self.config)
        return updated
