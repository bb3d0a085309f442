"""Drop the HF-only dataflow inside forward(): masks, caches, flags, and what is computed from them."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import findall, assigned_names, code, dotted, names_in, self_attr
from porter.passes.base import Example, Rule

_SHAPE_PURE = {"size", "shape", "dim", "view", "reshape", "transpose", "contiguous", "unsqueeze"}


class DropHfDataflow(Rule):
    descend_methods = frozenset()
    code = "PT011"
    name = "drop-hf-dataflow"
    why = (
        "Once mask/cache/flag parameters are gone, everything computed from them must go too: "
        "statements that assign from a stripped name or an HF-only helper (create_causal_mask, "
        "DynamicCache), `if` blocks that test one, the keyword arguments that pass one on, "
        "`if positions is None` blocks (the engine always passes positions), input-validation "
        "raises and `if self.training` blocks. Locals that nothing reads afterwards are removed. "
        "Taint is followed through the statements in order, so the rule removes exactly the HF plumbing."
    )
    examples = [
        Example(
            "class A(nn.Module):\n    def forward(self, x, positions):\n"
            "        mask = create_causal_mask(x)\n        if positions is None:\n            positions = 0\n"
            "        x = self.layer(x, attention_mask=mask)\n        return x, mask\n",
            "class A(nn.Module):\n    def forward(self, x, positions):\n"
            "        x = self.layer(x)\n        return x\n",
        )
    ]

    def leave_FunctionDef(self, original, updated):
        scope_cls = self.current_class
        super().leave_FunctionDef(original, updated)
        if not (self.kept(scope_cls) and len(self.scope) == 1 and updated.name.value == "forward"):
            return updated
        self._cls = scope_cls
        self.tainted: set[str] = set(self.ctx.table.strip_params) | set(self.ctx.extra_taint.get(scope_cls, ()))
        self.defined: set[str] = {p.name.value for p in updated.params.params}
        body = self._block(list(updated.body.body))
        if not body:
            body = [cst.SimpleStatementLine([cst.Pass()])]
        new = updated.with_changes(body=updated.body.with_changes(body=body))
        if new.deep_equals(updated):
            return updated
        self.mark(f"{scope_cls}.forward")
        return new

    # -- taint -----------------------------------------------------------------------------
    def _is_tainted(self, node: cst.CSTNode) -> bool:
        names = names_in(node)
        if names & self.tainted or names & self.ctx.table.hf_only_callables:
            return True
        for call in findall(node, m.Call()):
            name = dotted(call.func) or ""  # type: ignore[attr-defined]
            if name.split(".")[0] in self.ctx.table.hf_only_callables or name in self.ctx.table.hf_only_callables:
                return True
        for attr in findall(node, m.Attribute(value=m.Name("self"))):
            if (self._cls, self_attr(attr)) in self.ctx.removed_attrs:
                return True
        return False

    def _always_given_none_test(self, test: cst.BaseExpression) -> bool:
        given = set(self.ctx.table.rename_params.values())
        return m.matches(test, m.Comparison(left=m.Name(), comparisons=[m.ComparisonTarget(m.Is(), m.Name("None"))])) and test.left.value in given  # type: ignore[attr-defined]

    def _block(self, stmts: list[cst.BaseStatement]) -> list[cst.BaseStatement]:
        out: list[cst.BaseStatement] = []
        for st in stmts:
            new = self._statement(st)
            if new is not None:
                out.append(new)
        return out

    def _bound_names(self, node: cst.CSTNode) -> set[str]:
        out: set[str] = set()
        for a in findall(node, m.AssignTarget()):
            out.update(assigned_names(a.target))  # type: ignore[attr-defined]
        for w in findall(node, m.NamedExpr()):
            out.update(assigned_names(w.target))  # type: ignore[attr-defined]
        return out

    def _statement(self, st: cst.BaseStatement) -> cst.BaseStatement | None:
        if isinstance(st, cst.If):
            if self._is_tainted(st.test) or self._always_given_none_test(st.test):
                # names first bound in an HF-only branch are HF-only; re-bound ones keep their value
                self.tainted.update(self._bound_names(st) - self.defined)
                return None
            training = m.Attribute(value=m.Name("self"), attr=m.Name("training"))
            if m.matches(st.test, training) or m.matches(st.test, m.BooleanOperation(
                    operator=m.And(), left=training) | m.BooleanOperation(operator=m.And(), right=training)):
                return None  # training-only branch (LayerDrop and the like)
            if all(m.matches(s, m.SimpleStatementLine(body=[m.Raise()])) for s in st.body.body) and st.orelse is None:
                return None
            body = self._block(list(st.body.body))
            if not body:
                return None
            return st.with_changes(body=st.body.with_changes(body=body))
        if isinstance(st, (cst.For, cst.While, cst.With)):
            body = self._block(list(st.body.body))
            return st.with_changes(body=st.body.with_changes(body=body or [cst.SimpleStatementLine([cst.Pass()])]))
        if isinstance(st, cst.SimpleStatementLine):
            small_out = []
            for small in st.body:
                s = self._small(small)
                if s is not None:
                    small_out.append(s)
            if not small_out:
                return None
            return st.with_changes(body=small_out)
        return st

    def _small(self, small: cst.BaseSmallStatement) -> cst.BaseSmallStatement | None:
        if isinstance(small, (cst.Assign, cst.AnnAssign)):
            value = small.value
            targets = [t.target for t in small.targets] if isinstance(small, cst.Assign) else [small.target]
            if value is None:
                return None
            if self._reshape_to_hf_shape(targets, value):
                return None  # `x = x.view(output_shape)`, the shape HF-only: x keeps its (flat) value
            new_value = self._strip_args(value)
            if self._is_tainted(new_value):
                for t in targets:
                    self.tainted.update(assigned_names(t))
                return None
            if len(targets) == 1 and isinstance(targets[0], cst.Tuple) and self._single_return_call(value):
                # `out, weights = self.self_attn(...)` where that forward now returns `out` alone:
                # the other names are HF-only (attention weights)
                names = assigned_names(targets[0])
                self.tainted.update(names[1:])
                targets = [cst.Name(names[0])]
            for t in targets:  # a re-bound name is clean again
                self.tainted.difference_update(assigned_names(t))
                self.defined.update(assigned_names(t))
            if isinstance(small, cst.AnnAssign):
                return cst.Assign(targets=[cst.AssignTarget(small.target)], value=new_value)
            return small.with_changes(value=new_value)
        if isinstance(small, cst.Return) and small.value is not None:
            value = small.value
            if isinstance(value, cst.Tuple):
                kept = [e for e in value.elements if not self._is_tainted(e.value)]
                if len(kept) == 1:
                    self.ctx.single_return.add(self._cls)
                    return small.with_changes(value=self._strip_args(kept[0].value))
                return small.with_changes(value=self._strip_args(value.with_changes(elements=kept)))
            return small.with_changes(value=self._strip_args(value))
        if isinstance(small, cst.Expr):
            if self._is_tainted(small.value):
                return None
            return small.with_changes(value=self._strip_args(small.value))
        return small

    def _single_return_call(self, value: cst.BaseExpression) -> bool:
        info = self.ctx.idx.classes.get(self._cls or "")
        sub = info.submodules.get(self_attr(value.func) or "") if info and isinstance(value, cst.Call) else None  # type: ignore[attr-defined]
        return sub is not None and sub.ctor in self.ctx.single_return

    def _reshape_to_hf_shape(self, targets: list, value: cst.BaseExpression) -> bool:
        if not (len(targets) == 1 and isinstance(targets[0], cst.Name) and m.matches(value, m.Call(
                func=m.Attribute(value=m.Name(targets[0].value), attr=m.Name("view") | m.Name("reshape"))))):
            return False
        args = value.args  # type: ignore[attr-defined]
        return bool(args) and all(self._is_tainted(a.value) for a in args)

    def _strip_args(self, node: cst.BaseExpression) -> cst.BaseExpression:
        if not any(a.star == "**" or self._is_tainted(a.value)
                   for c in findall(node, m.Call()) for a in c.args):  # type: ignore[attr-defined]
            return node  # no argument to strip anywhere in it
        rule = self

        class _Args(cst.CSTTransformer):
            def leave_Call(self, original, updated):
                args = [a for a in updated.args if not (a.star == "**" or rule._is_tainted(a.value))]
                if len(args) == len(updated.args):
                    return updated
                if not args and self_attr(updated.func) and rule._cls != rule.plan.causal_lm and any(
                        not a.star and a.keyword is None for a in updated.args):
                    rule._lost_input(original)
                if args:
                    args[-1] = args[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
                return updated.with_changes(args=args)

        return node.visit(_Args())

    def _lost_input(self, call: cst.Call) -> None:
        """A sub-module call whose every positional input was computed from HF-only plumbing (CTRL:
        `self.dropout(hidden_states)` after the embedding sum that read `token_type_embeds`, bound
        only in an `if token_type_ids is not None` block, went): the port would call it with no
        input, and what HF computed there is lost."""
        text = code(call)
        info = self.ctx.idx.classes.get(self._cls or "")
        fwd = info.method("forward") if info else None
        node = next((c for c in findall(fwd, m.Call()) if code(c) == text), None) if fwd else None
        raise self.ctx.idx.error(
            "sub-module call whose every input was computed from HF-only plumbing (masks, caches, "
            "inputs the engine never passes): the port would lose what HF computes there", node,
            construct=f"{self._cls}.forward: {text}", rule=self.name)


class DropDropout(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT012"
    name = "drop-dropout"
    why = (
        "Inference never applies dropout: `nn.functional.dropout(x, p=..., training=self.training)` "
        "and calls of an `nn.Dropout` sub-module are replaced by their input."
    )
    examples = [
        Example(
            "class A(nn.Module):\n    def forward(self, x):\n"
            "        x = nn.functional.dropout(x, p=self.p, training=self.training)\n"
            "        return x\n",
            "class A(nn.Module):\n    def forward(self, x):\n        return x\n",
        ),
        Example(
            "from torch import nn\n\n\nclass A(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.dropout = nn.Dropout(config.dropout)\n\n"
            "    def forward(self, x):\n        return self.o_proj(self.dropout(x))\n",
            "from torch import nn\n\n\nclass A(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.dropout = nn.Dropout(config.dropout)\n\n"
            "    def forward(self, x):\n        return self.o_proj(x)\n",
        ),
    ]

    def leave_Call(self, original, updated):
        if not self.kept(self.current_class):
            return updated
        name = dotted(updated.func) or ""
        is_dropout = name.endswith("functional.dropout") or name == "F.dropout"
        attr = self_attr(updated.func)
        if attr is not None:
            info = self.ctx.idx.classes.get(self.current_class or "")
            sub = info.submodules.get(attr) if info else None
            is_dropout = is_dropout or (sub is not None and sub.ctor == "torch.nn.Dropout")
        if is_dropout and updated.args:
            return updated.args[0].value
        return updated

    def leave_Assign(self, original, updated):
        # `x = x` left by dropout removal
        if len(updated.targets) == 1 and m.matches(updated.value, m.Name()) and m.matches(
                updated.targets[0].target, m.Name()) and updated.value.value == updated.targets[0].target.value:  # type: ignore[attr-defined]
            return cst.RemoveFromParent()
        return updated


class DropDeadLocals(Rule):
    descend_methods = frozenset()
    code = "PT061"
    name = "drop-dead-locals"
    why = (
        "After the HF plumbing and the head reshapes are gone, some locals are computed and never "
        "read (`input_shape`, `hidden_shape`, `bsz, tgt_len, _ = x.size()`), or are assigned to "
        "themselves. Side-effect-free assignments nobody reads are removed, so the port passes "
        "`ruff check` and reads like hand-written code."
    )
    examples = [
        Example(
            "class A(nn.Module):\n    def forward(self, x):\n        shape = x.shape[:-1]\n"
            "        x = x\n        return self.f(x)\n",
            "class A(nn.Module):\n    def forward(self, x):\n        return self.f(x)\n",
        ),
        Example(  # in a loop's body: the layer type once chose the layer's mask
            "class M(nn.Module):\n    def forward(self, h):\n"
            "        for i, layer in enumerate(self.layers):\n"
            "            layer_type = self.config.layer_types[i]\n            h = layer(h)\n"
            "        return h\n",
            "class M(nn.Module):\n    def forward(self, h):\n"
            "        for i, layer in enumerate(self.layers):\n            h = layer(h)\n"
            "        return h\n",
        ),
    ]

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        if not self.kept(cls) or len(self.scope) != 1:
            return updated
        body = self._dead_locals(list(updated.body.body))
        # and in the body of a top-level loop (`layer_type = self.config.layer_types[i]`, once it
        # chose a mask), counting reads over the whole method
        reads = self._reads(body)
        for i, st in enumerate(body):
            if isinstance(st, cst.For) and isinstance(st.body, cst.IndentedBlock):
                inner = self._dead_locals(list(st.body.body), reads)
                if len(inner) != len(st.body.body) and inner:
                    body[i] = st.with_changes(body=st.body.with_changes(body=inner))
        if body == list(updated.body.body):
            return updated
        self.mark(f"{cls}.{updated.name.value}")
        return updated.with_changes(body=updated.body.with_changes(body=body or [cst.SimpleStatementLine([cst.Pass()])]))

    @staticmethod
    def _reads(body: list[cst.BaseStatement]) -> dict[str, int]:
        reads: dict[str, int] = {}
        for st in body:
            for n in findall(st, m.Name()):
                reads[n.value] = reads.get(n.value, 0) + 1  # type: ignore[attr-defined]
        return reads

    def _dead_locals(self, body: list[cst.BaseStatement],
                     outer: dict[str, int] | None = None) -> list[cst.BaseStatement]:
        """`body` without its dead assignments; `outer`: the reads of the enclosing method (a
        loop body's local may be read after the loop)."""
        changed = True
        while changed:
            changed = False
            reads = outer if outer is not None else self._reads(body)
            new_body = []
            for st in body:
                if m.matches(st, m.SimpleStatementLine(body=[m.Assign()])):
                    assign = st.body[0]  # type: ignore[attr-defined]
                    names = [n for t in assign.targets for n in assigned_names(t.target) if n != "_"]
                    value_reads = {n.value for n in findall(assign.value, m.Name())}  # type: ignore[attr-defined]
                    own = sum(1 for t in assign.targets for n in findall(t.target, m.Name()) if n.value != "_")  # type: ignore[attr-defined]
                    if m.matches(assign, m.Assign(targets=[m.AssignTarget(m.Name())], value=m.Name())) and \
                            assign.targets[0].target.value == assign.value.value:
                        changed = True
                        continue
                    if names and all(reads.get(n, 0) <= (1 if n not in value_reads else 2) for n in names) \
                            and own == len(names) and self._pure(assign.value):
                        changed = True
                        continue
                new_body.append(st)
            body = new_body
        return body

    def _pure(self, value: cst.BaseExpression) -> bool:
        for call in findall(value, m.Call()):
            func = call.func  # type: ignore[attr-defined]
            if isinstance(func, cst.Attribute) and func.attr.value in _SHAPE_PURE:
                continue
            if dotted(func) in self.ctx.table.hf_only_callables:  # HF plumbing queries (rules/hf_strip.yaml)
                continue
            return False
        return True




class DropBatchCollapse(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT013"
    name = "drop-batch-collapse"
    why = (
        "HF collapses leading batch dimensions with `x = x.view(-1, x.shape[-1])` (or "
        "`reshape(-1, x.size(-1))`). The engine's tensors are already flat (`[num_tokens]`, "
        "`[num_tokens, hidden]`), where this is at best a no-op and, on 1-D token ids, adds a "
        "dimension. The self-assignment is removed."
    )
    examples = [
        Example(
            "class A(nn.Module):\n    def forward(self, input_ids):\n"
            "        input_ids = input_ids.view(-1, input_ids.shape[-1])\n        return self.e(input_ids)\n",
            "class A(nn.Module):\n    def forward(self, input_ids):\n        return self.e(input_ids)\n",
        )
    ]

    def _collapse(self, value: cst.BaseExpression, name: str) -> bool:
        last = m.Subscript(value=m.Attribute(value=m.Name(name), attr=m.Name("shape")),
                           slice=[m.SubscriptElement(m.Index(m.UnaryOperation(operator=m.Minus(), expression=m.Integer("1"))))])
        last |= m.Call(func=m.Attribute(value=m.Name(name), attr=m.Name("size")),
                       args=[m.Arg(m.UnaryOperation(operator=m.Minus(), expression=m.Integer("1")))])
        return m.matches(value, m.Call(
            func=m.Attribute(value=m.Name(name), attr=m.Name("view") | m.Name("reshape")),
            args=[m.Arg(m.UnaryOperation(operator=m.Minus(), expression=m.Integer("1"))), m.Arg(last)]))

    def leave_SimpleStatementLine(self, original, updated):
        if not self.kept(self.current_class) or self.current_function != "forward":
            return updated
        if m.matches(updated, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())])])):
            assign = updated.body[0]
            name = assign.targets[0].target.value  # type: ignore[attr-defined]
            if self._collapse(assign.value, name):  # type: ignore[attr-defined]
                return cst.RemoveFromParent()
        return updated

    def leave_If(self, original, updated):
        # `if input_ids is not None: input_ids = input_ids.view(...)` leaves an empty block
        if self.kept(self.current_class) and self.current_function == "forward" and len(original.body.body) == 1 \
                and original.orelse is None:
            st = original.body.body[0]
            if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())])])):
                assign = st.body[0]  # type: ignore[attr-defined]
                if self._collapse(assign.value, assign.targets[0].target.value):
                    return cst.RemoveFromParent()
        return updated
