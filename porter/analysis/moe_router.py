"""What a mixture-of-experts router computes, read from its forward by abstract interpretation.

Each local of the router's forward is given an abstract value (the input, the logits, the scores,
the bias-corrected scores, group scores, top-k indices, routing weights with the operations
applied to them ...), statement by statement. Whatever is not one of these steps makes the value
unknown, and a router whose returned weights or indices are unknown is not read: porter never
approximates a router. What is read maps one to one onto the engine's router:

- scores: `softmax` or `sigmoid` of the logits (`scoring_func`);
- a correction bias added to the scores the top-k ranks, the weights gathered from the scores
  without it (`e_score_correction_bias`);
- grouped top-k: the experts viewed as `(groups, experts / groups)`, each group scored by the sum
  of its two best biased scores (without bias: its best score), the best `topk_group` groups kept
  (`num_expert_group`, `topk_group`);
- the top-k weights divided by their sum, maybe under `if self.flag:` (`renormalize`), or a softmax
  over the top-k logits only (the same thing), then multiplied by a scalar (`routed_scaling_factor`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import dotted, param_names, self_attr


@dataclass(frozen=True)
class V:
    """An abstract value: `kind` with what it was computed from."""
    kind: str
    of: V | None = None
    ops: tuple = ()  # routing weights: ("renorm", test), ("scale", expr) in order
    tag: str = ""  # scores: the scoring function; group scores: "top2sum" / "max"; softmax-of-top-k
    by: V | None = None  # gathered weights: the scores gathered; masked scores: the group scores


@dataclass
class Routing:
    weight: str  # the router projection's weight, relative to the router ("weight", "wg.weight")
    shape: list[cst.BaseExpression]  # (experts, hidden)
    top_k: cst.BaseExpression
    scoring: str = "softmax"
    renormalize: cst.BaseExpression | None = None
    bias: str | None = None  # "self.<attr>" (the router's own) or the name of a forward parameter
    bias_param: int = -1  # that parameter's position among the forward's arguments (without self)
    n_group: cst.BaseExpression | None = None
    topk_group: cst.BaseExpression | None = None
    scale: cst.BaseExpression | None = None
    outputs: tuple[int, int] = (1, 2)  # positions of (weights, indices) in the returned tuple
    function: bool = False  # not the engine's router: the router's own code as custom_routing_function
    logits: str = ""  # (function) the local the router assigns its logits to
    linear_bias: str | None = None  # the projection's own bias (`F.linear(x, self.weight, self.bias)`)
    facts: dict = field(default_factory=dict)


def _call(name: str) -> m.Call:
    """`torch.name(...)`, `F.name(...)`, `nn.functional.name(...)`, `name(...)` or `x.name(...)`."""
    return m.Call(func=m.Attribute(attr=m.Name(name)) | m.Name(name))


def _kw(call: cst.Call, name: str, pos: int | None = None) -> cst.BaseExpression | None:
    for a in call.args:
        if a.keyword is not None and a.keyword.value == name:
            return a.value
    positional = [a.value for a in call.args if a.keyword is None]
    return positional[pos] if pos is not None and pos < len(positional) else None


def _int(node: cst.BaseExpression | None) -> int | None:
    if isinstance(node, cst.Integer):
        return int(node.value)
    if m.matches(node, m.UnaryOperation(operator=m.Minus(), expression=m.Integer())):
        return -int(node.expression.value)  # type: ignore[union-attr]
    return None


_CASTS = {"float", "to", "type", "type_as", "contiguous"}
_PARAM = m.Call(func=m.Attribute(attr=m.Name("Parameter") | m.Name("Buffer")) | m.Name("Parameter") | m.Name("Buffer"))


class RouterReader:
    def __init__(self, info, attrs: dict[str, cst.BaseExpression], linears: dict[str, cst.Call]) -> None:
        self.info, self.attrs, self.linears = info, attrs, linears
        self.env: dict[str, V | None] = {}
        self.routing: Routing | None = None
        self.weight: str | None = None
        self.shape: list[cst.BaseExpression] | None = None
        self.bias: str | None = None
        self.top_k: cst.BaseExpression | None = None
        self.group: dict[str, cst.BaseExpression] = {}
        self.logits_at: list[str] = []  # the locals the projection is assigned to
        self.returns = 0
        self.base_linear: list[cst.BaseExpression] | None = None  # (in, out) of an nn.Linear base class
        self.linear_bias: str | None = None
        self.branch: int | None = None  # the branch of a keyed if/elif chain read (keyed_branch)

    # -- tensors held by the router --------------------------------------------------------
    def _param_dims(self, attr: str | None) -> list[cst.BaseExpression] | None:
        value = self.attrs.get(attr or "")
        if not m.matches(value, _PARAM):
            return None
        inner = value.args[0].value if value.args else None  # type: ignore[union-attr]
        if not m.matches(inner, m.Call(func=m.Attribute(value=m.Name("torch")))):
            return None
        dims = [a.value for a in inner.args if a.keyword is None]  # type: ignore[union-attr]
        if len(dims) == 1 and isinstance(dims[0], cst.Tuple):
            dims = [e.value for e in dims[0].elements]
        return dims

    def _bias(self, node: cst.BaseExpression) -> str | None:
        """A per-expert bias: a 1-D tensor of the router, or one handed to its forward."""
        attr = self_attr(node)
        if attr is not None:
            dims = self._param_dims(attr)
            return f"self.{attr}" if dims is not None and len(dims) == 1 else None
        if isinstance(node, cst.Name) and node.value in self.params and self.env.get(node.value) is None:
            return node.value
        return None

    def _scalar(self, node: cst.BaseExpression) -> bool:
        """A number, or a router attribute that is not a tensor."""
        if isinstance(node, (cst.Integer, cst.Float)):
            return True
        attr = self_attr(node)
        return attr is not None and attr in self.attrs and self._param_dims(attr) is None \
            and attr not in self.linears and not m.matches(self.attrs[attr], m.Call())

    # -- expressions -----------------------------------------------------------------------
    def value(self, node: cst.BaseExpression) -> V | None:  # noqa: C901 - one case per step
        if isinstance(node, cst.Name):
            return self.env.get(node.value)
        if m.matches(node, m.Attribute(attr=m.Name("shape"))):
            return V("shape") if self.value(node.value) is not None else None  # type: ignore[attr-defined]
        if isinstance(node, cst.Subscript):
            return self._subscript(node)
        if isinstance(node, cst.BinaryOperation):
            return self._binary(node)
        if m.matches(node, m.UnaryOperation(operator=m.BitInvert())):
            inner = self.value(node.expression)  # type: ignore[attr-defined]
            return V("not-smask", inner.of) if inner is not None and inner.kind == "smask-bool" else None
        if isinstance(node, cst.Attribute) and node.attr.value == "values":
            inner = self.value(node.value)
            return inner.of if inner is not None and inner.kind == "max" else None
        if isinstance(node, cst.Call):
            return self._call(node)
        return None

    def _subscript(self, node: cst.Subscript) -> V | None:
        base = self.value(node.value)
        if base is None or len(node.slice) != 1 or not isinstance(node.slice[0].slice, cst.Index):
            return None
        i = _int(node.slice[0].slice.value)
        if base.kind == "topk" and i in (0, 1):
            return V("vals" if i == 0 else "idx", base)
        if base.kind == "top2" and i == 0:
            return V("top2vals", base.of)  # of: the scores grouped
        if base.kind == "max" and i == 0:
            return base.of
        return None

    def _binary(self, node: cst.BinaryOperation) -> V | None:
        left, right = _as_weights(self.value(node.left)), self.value(node.right)
        op = node.operator
        if isinstance(op, cst.Add):
            if left is not None and left.kind == "scores" and right is None and (b := self._bias(node.right)):
                return self._biased(left, b)
            if right is not None and right.kind == "scores" and left is None and (b := self._bias(node.left)):
                return self._biased(right, b)
            # sum + a tiny epsilon (1e-20): the same division wherever the sum is not zero
            if left is not None and left.kind == "wsum" and isinstance(node.right, cst.Float) \
                    and float(node.right.value) <= 1e-12:
                return left
            return None
        if isinstance(op, cst.Divide) and left is not None and left.kind == "weights" and right is not None \
                and right.kind == "wsum" and right.of == left:
            return self._renorm(left, cst.Name("True"))
        if isinstance(op, cst.Multiply) and left is not None and left.kind == "weights" and right is None \
                and self._scalar(node.right):
            return replace(left, ops=left.ops + (("scale", node.right),))
        return None

    def _biased(self, scores: V, bias: str) -> V | None:
        if self.bias not in (None, bias):
            return None
        self.bias = bias
        return V("choice", scores)

    def _renorm(self, weights: V, test: cst.BaseExpression) -> V | None:
        if weights.ops:  # renormalised twice, or after scaling: not the engine's order
            return None
        return replace(weights, ops=(("renorm", test),))

    def _call(self, node: cst.Call) -> V | None:  # noqa: C901 - one case per step
        func = node.func
        name = func.attr.value if isinstance(func, cst.Attribute) else (func.value if isinstance(func, cst.Name) else None)
        recv = self.value(func.value) if isinstance(func, cst.Attribute) else None
        first = self.value(node.args[0].value) if node.args else None
        # the routing weights' casts and the input's reshapes change nothing the router computes
        if recv is not None and name in _CASTS:
            return recv
        if recv is not None and recv.kind == "x" and name in ("view", "reshape"):
            return recv
        # the projection: F.linear(x, self.weight) or a bias-free nn.Linear of the router
        if name == "linear" and first is not None and first.kind == "x" and len(node.args) in (2, 3):
            w = node.args[1].value
            while m.matches(w, m.Call(func=m.Attribute(attr=m.Name("float") | m.Name("to") | m.Name("type")))):
                w = w.func.value  # type: ignore[union-attr]
            dims = self._param_dims(self_attr(w))
            bias = self_attr(node.args[2].value) if len(node.args) == 3 else None
            if dims is None or len(dims) != 2 or (len(node.args) == 3 and len(self._param_dims(bias) or ()) != 1):
                return None
            self.linear_bias = bias
            return self._logits(self_attr(w), dims)  # type: ignore[arg-type]
        # the router is an nn.Linear itself: `super().forward(x)`
        if m.matches(func, m.Attribute(value=m.Call(func=m.Name("super")), attr=m.Name("forward"))) \
                and self.base_linear is not None and first is not None and first.kind == "x" and len(node.args) == 1:
            return self._logits("weight", [self.base_linear[1], self.base_linear[0]])
        if (attr := self_attr(func)) in self.linears and first is not None and first.kind == "x" and len(node.args) == 1:
            ctor = self.linears[attr]
            bias = _kw(ctor, "bias", 2)
            dims = [_kw(ctor, "out_features", 1), _kw(ctor, "in_features", 0)]
            if not m.matches(bias, m.Name("False")) or None in dims:
                return None
            return self._logits(f"{attr}.weight", dims)  # type: ignore[arg-type]
        # scores
        if name in ("sigmoid", "softmax"):
            src = recv if recv is not None else first
            if src is None:
                return None
            dim = _int(_kw(node, "dim", 0 if recv is not None else 1))
            if name == "softmax" and dim not in (-1, 1):
                return None
            if src.kind == "logits":
                return V("scores", tag=name)
            if name == "softmax" and src.kind == "vals" and src.of.of.kind == "logits":  # type: ignore[union-attr]
                # a softmax over the top-k logits: the renormalised top-k of a softmax
                return V("weights", src, ops=(("renorm", cst.Name("True")),), tag="softmax-topk")
            return None
            return None
        if name == "topk":
            return self._topk(node, recv, first)
        if name == "gather":
            src = recv if recv is not None else first
            index = _kw(node, "index", 1 if recv is not None else 2)
            idx = self.value(index) if index is not None else None
            if src is not None and src.kind == "scores" and idx is not None and idx.kind == "idx" \
                    and _int(_kw(node, "dim", 0 if recv is not None else 1)) in (1, -1):
                return V("weights", idx, by=src)
            return None
        if name == "sum" and recv is not None:
            recv = _as_weights(recv)
        if name == "sum" and recv is not None and recv.kind == "weights" \
                and _int(_kw(node, "dim", 0)) == -1 and m.matches(_kw(node, "keepdim"), m.Name("True")):
            return V("wsum", recv)
        return self._group_call(node, name, recv, first)

    def _group_call(self, node: cst.Call, name: str | None, recv: V | None, first: V | None) -> V | None:
        """The steps of grouped top-k: group scores, the groups kept, the mask over their experts."""
        if name == "sum" and recv is not None and recv.kind == "top2vals" and _int(_kw(node, "dim", 0)) == -1:
            return V("gscore", recv.of, tag="top2sum")
        if name in ("max", "amax") and recv is not None and recv.kind == "gview" and _int(_kw(node, "dim", 0)) == -1:
            score = V("gscore", recv.of, tag="max")
            return score if name == "amax" else V("max", score)
        if name == "view" and recv is not None and recv.kind in ("choice", "scores") and len(node.args) == 3:
            self.group["n_group"] = node.args[1].value
            return V("gview", recv)
        if name == "zeros_like" and first is not None and first.kind == "gscore":
            return V("gmask0", first)
        # the group mask spread over each group's experts (each step keeps the group scores)
        if name == "unsqueeze" and recv is not None and recv.kind == "gmask":
            return V("gmask-u", recv.of)
        if name == "expand" and recv is not None and recv.kind == "gmask-u":
            return V("gmask-e", recv.of)
        if name == "reshape" and recv is not None and recv.kind == "gmask-e":
            return V("smask", recv.of)
        if name == "bool" and recv is not None and recv.kind == "smask":
            return V("smask-bool", recv.of)
        if name == "masked_fill" and recv is not None and recv.kind in ("choice", "scores") and len(node.args) == 2:
            mask = self.value(node.args[0].value)
            fill = node.args[1].value
            neg_inf = m.Call(func=m.Name("float"), args=[m.Arg(m.SimpleString('"-inf"') | m.SimpleString("'-inf'"))])
            # 0 below every softmax / sigmoid score: the kept experts rank first, as with -inf
            zero = m.Float("0.0") | m.Integer("0") if recv.kind == "scores" else neg_inf
            if mask is not None and mask.kind == "not-smask" and m.matches(fill, neg_inf | zero):
                return V("masked", recv, by=mask.of)
            return None
        return None

    def _logits(self, weight: str, dims: list[cst.BaseExpression]) -> V | None:
        if self.weight not in (None, weight):
            return None
        self.weight, self.shape = weight, dims
        return V("logits")

    def _topk(self, node: cst.Call, recv: V | None, first: V | None) -> V | None:
        src = recv if recv is not None else first
        k = _kw(node, "k", 0 if recv is not None else 1)
        if src is None or k is None or _int(_kw(node, "dim")) not in (None, -1, 1):
            return None
        if src.kind == "gview" and _int(k) == 2:
            return V("top2", src.of)
        if src.kind == "gscore":
            self.group["topk_group"] = k
            return V("topk", src)
        if src.kind in ("scores", "choice", "masked", "logits"):
            if self.top_k is not None and not self.top_k.deep_equals(k):
                return None
            self.top_k = k
            return V("topk", src)
        return None

    # -- statements ------------------------------------------------------------------------
    def run(self, body) -> None:
        for st in body:
            self.statement(st)

    def statement(self, st: cst.CSTNode) -> None:  # noqa: C901 - one case per statement kind
        if isinstance(st, cst.SimpleStatementLine):
            for s in st.body:
                self.small(s)
        elif isinstance(st, cst.If):
            self.conditional(st)
        elif isinstance(st, cst.With) and all(self._harmless_context(i.item) for i in st.items):
            self.run(st.body.body)  # type: ignore[attr-defined]
        else:
            self.invalidate(st)

    @staticmethod
    def _harmless_context(item: cst.BaseExpression) -> bool:
        """`torch.no_grad()`, or autocast switched off: the router computes as written."""
        if m.matches(item, m.Call(func=m.Attribute(attr=m.Name("no_grad")) | m.Name("no_grad"))):
            return True
        name = dotted(item.func) if isinstance(item, cst.Call) else None
        return bool(name and "autocast" in name and m.matches(_kw(item, "enabled"), m.Name("False")))  # type: ignore[arg-type]

    def small(self, s: cst.BaseSmallStatement) -> None:  # noqa: C901
        if isinstance(s, cst.Assign) and len(s.targets) == 1:
            t = s.targets[0].target
            v = self.value(s.value)
            if isinstance(t, cst.Name):
                self.env[t.value] = v
                if v is not None and v.kind == "logits":
                    self.logits_at.append(t.value)
            elif isinstance(t, cst.Tuple) and v is not None and v.kind == "topk" and len(t.elements) == 2:
                for i, el in enumerate(t.elements):
                    if isinstance(el.value, cst.Name):
                        self.env[el.value.value] = V("vals" if i == 0 else "idx", v)
            elif isinstance(t, cst.Tuple) and v is not None and v.kind == "shape":
                for el in t.elements:
                    if isinstance(el.value, cst.Name):
                        self.env[el.value.value] = V("dim")
            else:
                self.invalidate(s)
        elif isinstance(s, cst.AugAssign) and isinstance(s.target, cst.Name):
            cur = self.env.get(s.target.value)
            v = self.value(cst.BinaryOperation(s.target, _AUG.get(type(s.operator), cst.Add)(), s.value)) \
                if type(s.operator) in _AUG else None
            self.env[s.target.value] = v if cur is not None else None
        elif isinstance(s, cst.Return):
            self.returned(s.value)
        elif isinstance(s, cst.Expr) and m.matches(s.value, m.Call(func=m.Attribute(attr=m.Name("scatter_")))):
            call = s.value
            target = call.func.value  # type: ignore[attr-defined]
            mask = self.value(target)
            idx = self.value(call.args[1].value) if len(call.args) == 3 else None  # type: ignore[attr-defined]
            ok = mask is not None and mask.kind == "gmask0" and idx is not None and idx.kind == "idx" \
                and idx.of.of == mask.of and _int(call.args[0].value) in (1, -1) \
                and _int(call.args[2].value) == 1  # type: ignore[attr-defined]
            if isinstance(target, cst.Name):
                self.env[target.value] = V("gmask", mask.of) if ok else None  # type: ignore[union-attr]
        elif isinstance(s, cst.Expr) and isinstance(s.value, (cst.SimpleString, cst.ConcatenatedString)):
            pass  # a docstring
        else:
            self.invalidate(s)

    def conditional(self, st: cst.If) -> None:
        """`if self.flag: w /= w.sum(...)` renormalises under that flag; a branch that only casts
        (`if self.wg.weight.dtype == torch.float32: x = x.float()`) changes nothing read here."""
        training = m.Attribute(value=m.Name("self"), attr=m.Name("training"))
        if st.orelse is None and m.matches(st.test, training | m.BooleanOperation(left=training, operator=m.And())):
            return  # training only (the engine runs the model in eval mode)
        before = dict(self.env)
        if (chosen := keyed_branch(st, self.branch)) is not None:
            self.run(chosen)  # one branch of a keyed chain, read as if it were the only one
            return
        self.run(st.body.body)  # type: ignore[attr-defined]
        after, self.env = self.env, before
        if st.orelse is not None:
            self.invalidate(st)
            return
        for name, v in after.items():
            old = before.get(name)
            if v == old:
                continue
            old, v = _as_weights(old), _as_weights(v)
            if old is not None and v is not None and old.kind == "weights" and v.kind == "weights" \
                    and replace(v, ops=()) == old and not old.ops and [o for o, _ in v.ops] == ["renorm"] \
                    and self_attr(st.test) is not None:
                self.env[name] = replace(v, ops=(("renorm", st.test),))
            else:
                self.env[name] = None

    def invalidate(self, node: cst.CSTNode) -> None:
        """A statement not read here: every local it names becomes unknown."""
        from porter.analysis.cstutil import names_in

        for name in names_in(node) if not isinstance(node, cst.BaseCompoundStatement) else _all_names(node):
            if name in self.env:
                self.env[name] = None

    def returned(self, node: cst.BaseExpression | None) -> None:
        self.returns += 1
        if not isinstance(node, cst.Tuple) or self.routing is not None:
            self.routing = None
            return
        vals = [_as_weights(self.value(e.value)) for e in node.elements]
        w = [i for i, v in enumerate(vals) if v is not None and v.kind == "weights"]
        ix = [i for i, v in enumerate(vals) if v is not None and v.kind == "idx"]
        if len(w) != 1 or len(ix) != 1:
            return
        self.routing = self.check(vals[w[0]], vals[ix[0]], (w[0], ix[0]))  # type: ignore[arg-type]

    # -- what the engine's router is --------------------------------------------------------
    def check(self, weights: V, idx: V, outputs: tuple[int, int]) -> Routing | None:  # noqa: C901
        topk = idx.of
        ranked = topk.of  # type: ignore[union-attr]
        src = weights.of  # what the weights came from: the top-k (its values) or the indices (gather)
        if self.weight is None or self.top_k is None or ranked is None:
            return None
        grouped = ranked.kind == "masked"
        base = ranked.of if grouped else ranked  # scores or biased scores
        if base is None or (grouped and base.kind not in ("scores", "choice")):
            return None
        scores = base.of if base.kind == "choice" else base
        if weights.tag == "softmax-topk":
            if src.of != topk or ranked.kind != "logits":  # type: ignore[union-attr]
                return None
            scoring = "softmax"
        elif ranked.kind == "logits" or scores is None or scores.kind != "scores":
            return None
        else:
            scoring = scores.tag
            if src.kind == "vals":  # the top-k's own values: the scores ranked, unbiased
                if src.of != topk or base.kind != "scores":
                    return None
            elif src.kind != "idx" or src != idx or weights.by != scores:
                return None
        if grouped:
            gm = ranked.by
            if gm is None or gm.of != base or (gm.tag == "top2sum") != (base.kind == "choice"):
                return None
        ops = dict(weights.ops)
        if len(ops) != len(weights.ops) or [o for o, _ in weights.ops] not in ([], ["renorm"], ["scale"], ["renorm", "scale"]):
            return None
        r = Routing(weight=self.weight, shape=self.shape, top_k=self.top_k, scoring=scoring,  # type: ignore[arg-type]
                    renormalize=ops.get("renorm"), scale=ops.get("scale"), outputs=outputs,
                    linear_bias=self.linear_bias)
        if base.kind == "choice":
            r.bias = self.bias
            if self.bias is not None and not self.bias.startswith("self."):
                r.bias_param = self.params.index(self.bias) - 1
        if grouped:
            r.n_group, r.topk_group = self.group.get("n_group"), self.group.get("topk_group")
            if r.n_group is None or r.topk_group is None:
                return None
        return r

    def read(self, fwd: cst.FunctionDef) -> Routing | None:
        self.params = param_names(fwd)
        args = [p for p in self.params if p != "self"]
        if not args:
            return None
        self.env[args[0]] = V("x")
        self.run(fwd.body.body)  # type: ignore[attr-defined]
        return self.routing


def keyed_tests(st: cst.If) -> list[cst.BaseExpression] | None:
    """The tests of an `if self.a == "x": ... elif self.a == "y": ...` chain (one attribute against
    distinct literals, no `else`: one branch runs, or none), or None."""
    tests, node = [], st
    while isinstance(node, cst.If):
        if not m.matches(node.test, m.Comparison(left=m.Attribute(value=m.Name("self")), comparisons=[
                m.ComparisonTarget(operator=m.Equal(), comparator=m.SimpleString())])):
            return None
        tests.append(node.test)
        node = node.orelse  # type: ignore[assignment]
    if node is not None or len({code_of(t.left) for t in tests}) != 1 or \
            len({t.comparisons[0].comparator.value for t in tests}) != len(tests):  # type: ignore[attr-defined]
        return None
    return tests


def keyed_branch(st: cst.If, branch: int | None) -> list | None:
    """The statements of branch `branch` of a keyed chain (keyed_tests), or None."""
    tests = keyed_tests(st)
    if tests is None or branch is None or not 0 <= branch < len(tests) or len(tests) < 2:
        return None
    node = st
    for _ in range(branch):
        node = node.orelse  # type: ignore[assignment]
    return list(node.body.body)  # type: ignore[attr-defined]


def code_of(node: cst.CSTNode) -> str:
    return cst.Module(body=[]).code_for_node(node)


_AUG = {cst.DivideAssign: cst.Divide, cst.MultiplyAssign: cst.Multiply}


def _as_weights(v: V | None) -> V | None:
    """The values of a top-k are routing weights as soon as they are used as such."""
    return V("weights", v) if v is not None and v.kind == "vals" else v


def _all_names(node: cst.CSTNode) -> set[str]:
    from porter.analysis.cstutil import walk

    return {n.value for n in walk(node) if type(n) is cst.Name}  # type: ignore[attr-defined]


def read_router(info, attrs: dict[str, cst.BaseExpression], linears: dict[str, cst.Call],
                base_linear: list[cst.BaseExpression] | None = None, branch: int | None = None) -> Routing | None:
    """The routing a router class computes, or None when any step of it is not the engine's.

    A router whose steps after the projection are not the engine's (a clamped renormalisation, a
    sparsemixer) but which computes its logits once, from one projection used nowhere else, and
    returns its weights and indices from one final `return`, is read as a routing *function*
    (`Routing.function`): the port keeps its own code after the logits as the engine's
    `custom_routing_function` (passes/moe/routing_function.py), run on the logits the gate computed."""
    fwd = info.method("forward")
    if fwd is None:
        return None
    reader = RouterReader(info, attrs, linears)
    reader.base_linear, reader.branch = base_linear, branch
    routing = reader.read(fwd)
    if routing is not None:
        return routing
    last = fwd.body.body[-1] if fwd.body.body else None  # type: ignore[attr-defined]
    if len(reader.logits_at) != 1 or reader.weight is None or reader.returns != 1 or reader.linear_bias or not m.matches(
            last, m.SimpleStatementLine(body=[m.Return(value=m.Tuple())])):
        return None
    held = reader.weight.partition(".")[0]
    uses = [n for n in _all_attrs(fwd) if n == held]
    if len(uses) > 1 or (reader.base_linear is not None and len(findall_super(fwd)) != 1):
        return None  # the projection's weight read again after the logits
    top_k = _function_top_k(fwd)
    if top_k is None:
        return None
    r = Routing(weight=reader.weight, shape=reader.shape, top_k=top_k)  # type: ignore[arg-type]
    r.function, r.logits = True, reader.logits_at[0]
    return r


def _function_top_k(fwd: cst.FunctionDef) -> cst.BaseExpression | None:
    """How many experts a routing function picks: the k of its one top-k call, or the `top_k=` it
    hands the helper that picks them (phimoe's sparsemixer)."""
    from porter.analysis.cstutil import findall

    topks = findall(fwd, m.Call(func=m.Attribute(attr=m.Name("topk"))))
    ks = [_kw(t, "k", 0 if dotted(t.func) != "torch.topk" else 1) for t in topks]  # type: ignore[arg-type, attr-defined]
    # one top-k, or one per branch of an `if self.flag: ... else: ...` (lfm2_moe), all of the same k
    if ks and all(k is not None and k.deep_equals(ks[0]) for k in ks):
        return ks[0]
    if topks:
        return None
    ks = [a.value for c in findall(fwd, m.Call()) for a in c.args  # type: ignore[attr-defined]
          if a.keyword is not None and a.keyword.value in ("top_k", "k")]
    return ks[0] if len(ks) == 1 else None


def _all_attrs(node: cst.CSTNode) -> list[str]:
    from porter.analysis.cstutil import walk

    return [a for n in walk(node) if (a := self_attr(n)) is not None]  # type: ignore[arg-type]


def findall_super(node: cst.CSTNode) -> list[cst.CSTNode]:
    from porter.analysis.cstutil import findall

    return findall(node, m.Call(func=m.Attribute(value=m.Call(func=m.Name("super")), attr=m.Name("forward"))))
