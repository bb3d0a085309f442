"""PT011 drop-hf-dataflow: the rule `DropHfDataflow`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import assigned_names, code, dotted, findall, loop_module, names_in, self_attr
from porter.passes.base import Example, Rule


class DropHfDataflow(Rule):
    descend_methods = frozenset()
    code = "PT011"
    name = "drop-hf-dataflow"
    why = (
        "Once mask/cache/flag parameters are gone, everything computed from them must go too: "
        "statements that assign from a stripped name or an HF-only helper (create_causal_mask, "
        "DynamicCache), `if` blocks that test one, the keyword arguments that pass one on, "
        "`if positions is None` blocks (the engine always passes positions), input-validation "
        "raises and `if self.training` blocks (their `else` is what inference runs), the arms of a flag "
        "the port treats as false (`if use_cache: A else: B` keeps B; `if output_router_logits: A` goes). Locals that nothing reads afterwards are removed. "
        "Where a sub-module now returns its output alone, `outs[1:]` of its result (the rest of HF's tuple: "
        "cache, weights) is HF-only, and `(h,) + <HF-only>` keeps `(h,)`. Where it now returns fewer values "
        "but still several (GPT-NeoX-Japanese's `out, self.dense_bias`), its callers' unpacking drops the same positions. "
        "A torch function handed an HF-only operand by position computes from it: its value is HF-only "
        "(the engine's positions so computed are refused: no rule shows they are the engine's). "
        "Taint is followed through the statements in order, so the rule removes exactly the HF plumbing."
    )
    examples = [
        Example(
            "class A(nn.Module):\n    def forward(self, x, positions):\n"
            "        mask = create_causal_mask(x)\n        if positions is None:\n            positions = 0\n"
            "        x = self.layer(x, attention_mask=mask)\n        return x, mask\n",
            "class A(nn.Module):\n    def forward(self, x, positions):\n"
            "        x = self.layer(x)\n        return x\n",
        ),
        # a torch function handed an HF-only operand by position computes from it: its value is
        # HF's (a causal mask sized by the cache length), not the call without that operand
        Example(
            "class A(nn.Module):\n    def forward(self, x, past_key_values):\n"
            "        past = past_key_values[0][0].shape[2]\n"
            "        mask = torch.triu(torch.full((3, past + 3), -1e9), diagonal=past + 1)\n"
            "        x = self.layer(x, attention_mask=mask)\n        return x\n",
            "class A(nn.Module):\n    def forward(self, x, past_key_values):\n"
            "        x = self.layer(x)\n        return x\n",
        ),
        # an input the engine never has is None: HF's `else` arm is what runs (CTRL)
        Example(
            "class A(nn.Module):\n    def forward(self, x, token_type_ids):\n"
            "        if token_type_ids is not None:\n            t = self.w(token_type_ids)\n"
            "        else:\n            t = 0\n        return self.drop(x + t)\n",
            "class A(nn.Module):\n    def forward(self, x, token_type_ids):\n"
            "        t = 0\n        return self.drop(x + t)\n",
        ),
        # a flag of what HF returns beside the hidden states (rules/hf_strip.yaml false_flags), kept as a
        # parameter (transformers 4.x Mixtral's output_router_logits): its `if` without `else` never runs
        Example(
            "class A(nn.Module):\n    def forward(self, x, output_router_logits=False):\n"
            "        x, router_logits = self.moe(x)\n        outputs = (x,)\n"
            "        if output_router_logits:\n            outputs += (router_logits,)\n        return outputs\n",
            "class A(nn.Module):\n    def forward(self, x, output_router_logits=False):\n"
            "        x, router_logits = self.moe(x)\n        outputs = (x,)\n        return outputs\n",
        ),
        # transformers 4.x gradient checkpointing: inference runs the `else` arm
        Example(
            "class A(nn.Module):\n    def forward(self, x):\n"
            "        for layer in self.layers:\n"
            "            if self.gradient_checkpointing and self.training:\n"
            "                out = self._gradient_checkpointing_func(layer.__call__, x)\n"
            "            else:\n                out = layer(x)\n            x = out[0]\n        return x\n",
            "class A(nn.Module):\n    def forward(self, x):\n"
            "        for layer in self.layers:\n            out = layer(x)\n            x = out[0]\n        return x\n",
        ),
        # a sub-module that now returns its output alone (4.x's `return attn_output, layer_past`):
        # the rest of its tuple was HF-only, and a tuple built from it keeps the port's part
        Example(
            "class A(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.attn = Attn(config)\n\n    def forward(self, x):\n        outs = self.attn(x)\n"
            "        h = outs[0]\n        rest = outs[1:]\n        out = (h,) + rest\n        return out\n",
            "class A(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.attn = Attn(config)\n\n    def forward(self, x):\n        outs = self.attn(x)\n"
            "        h = outs[0]\n        out = (h,)\n        return out\n",
            seed={"single_return": {"Attn"}},
        ),
        # a sub-module whose forward now returns fewer values, still a tuple (GPT-NeoX-Japanese's attention:
        # `return out, weights, self.dense_bias` -> `return out, self.dense_bias`): its callers unpack what
        # is left, the names at the dropped positions are HF-only
        Example(
            "class A(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.attn = Attn(config)\n\n    def forward(self, x):\n"
            "        h, w, b = self.attn(x)\n        h = h + b\n        return h, w\n",
            "class A(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.attn = Attn(config)\n\n    def forward(self, x):\n"
            "        h, b = self.attn(x)\n        h = h + b\n        return h\n",
            seed={"narrowed_return": {"Attn": (3, (0, 2))}},
        ),
    ]

    def leave_FunctionDef(self, original, updated):
        scope_cls = self.current_class
        super().leave_FunctionDef(original, updated)
        if not (self.kept(scope_cls) and len(self.scope) == 1 and updated.name.value == "forward"):
            return updated
        self._cls = scope_cls
        self.tainted: set[str] = set(self.ctx.table.strip_params) | set(self.ctx.extra_taint.get(scope_cls, ()))
        self.defined: set[str] = {p.name.value for p in updated.params.params}
        self._loop_vars: dict[str, str] = {}  # loop variable -> the module list it runs over
        self._single_names: set[str] = set()  # names bound to a call that now returns one value
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
            if name.startswith("self.") and name[5:] in self.ctx.table.drop_methods:
                return True  # a method the port drops (4.x's `self._update_causal_mask(...)`): HF-only
        for attr in findall(node, m.Attribute(value=m.Name("self"))):
            if (self._cls, self_attr(attr)) in self.ctx.removed_attrs:
                return True
            if self_attr(attr) in self.ctx.table.drop_init_attrs:
                return True  # an attribute only HF sets (4.x's `self.model_parallel`): its branches are HF-only
        return False

    def _always_given_none_test(self, test: cst.BaseExpression) -> bool:
        given = set(self.ctx.table.rename_params.values())
        return m.matches(test, m.Comparison(left=m.Name(), comparisons=[m.ComparisonTarget(m.Is(), m.Name("None"))])) and test.left.value in given  # type: ignore[attr-defined]

    def _block(self, stmts: list[cst.BaseStatement]) -> list[cst.BaseStatement]:
        out: list[cst.BaseStatement] = []
        for st in stmts:
            arm = self._absent_arm(st)
            if arm is None and self._training_test(st) and isinstance(st.orelse, cst.Else):  # type: ignore[attr-defined]
                arm = list(st.orelse.body.body)  # type: ignore[attr-defined]  # gradient checkpointing's `else`
            if arm is not None:  # the arm HF runs when the input is not given
                out.extend(self._block(arm))
                continue
            new = self._statement(st)
            if new is not None:
                out.append(new)
        return out

    def _absent_arm(self, st: cst.BaseStatement) -> list[cst.BaseStatement] | None:
        """`if token_type_ids is not None: A else: B` (an input the engine never has, rules/hf_strip.yaml
        absent_params): HF runs B when it is not given; `is None` runs A. `if use_cache: A else: B`
        (false_flags): B, what HF returns without a cache."""
        if isinstance(st, cst.If) and isinstance(st.orelse, cst.Else) and m.matches(st.test, m.Name()) \
                and st.test.value in self.ctx.table.false_flags:  # type: ignore[attr-defined]
            return list(st.orelse.body.body)  # `if use_cache: A else: B`: the port returns no cache (B)
        if isinstance(st, cst.If) and st.orelse is None and m.matches(st.test, m.Name()) \
                and st.test.value in self.ctx.table.false_flags:  # type: ignore[attr-defined]
            return []  # `if output_router_logits: outputs += (router_logits,)`: what the port never returns
        if not isinstance(st, cst.If) or not isinstance(st.orelse, cst.Else) or not m.matches(st.test, m.Comparison(
                left=m.Name(), comparisons=[m.ComparisonTarget(m.Is() | m.IsNot(), m.Name("None"))])):
            return None
        if st.test.left.value not in self.ctx.table.absent_params:  # type: ignore[attr-defined]
            return None
        none_arm = st.body if isinstance(st.test.comparisons[0].operator, cst.Is) else st.orelse.body  # type: ignore[attr-defined]
        return list(none_arm.body)

    @staticmethod
    def _training_test(st: cst.BaseStatement) -> bool:
        """`if self.training:` / `if X and self.training:`: a branch only training runs."""
        training = m.Attribute(value=m.Name("self"), attr=m.Name("training"))
        return isinstance(st, cst.If) and (m.matches(st.test, training) or m.matches(st.test, m.BooleanOperation(
            operator=m.And(), left=training) | m.BooleanOperation(operator=m.And(), right=training)))

    def _orelse(self, orelse: cst.If | cst.Else | None) -> cst.If | cst.Else | None:
        """The `elif` / `else` arms of a kept `if`, rewritten as its body is (an arm left empty: `pass`)."""
        if isinstance(orelse, cst.If):
            kept = self._statement(orelse)
            if kept is None:  # an HF-only `elif`: what follows it still runs when its test is false
                return self._orelse(orelse.orelse)
            return kept  # type: ignore[return-value]
        if isinstance(orelse, cst.Else):
            body = self._block(list(orelse.body.body)) or [cst.SimpleStatementLine([cst.Pass()])]
            return orelse.with_changes(body=orelse.body.with_changes(body=body))
        return orelse

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
            if self._training_test(st):
                return None  # training-only branch (LayerDrop and the like)
            if all(m.matches(s, m.SimpleStatementLine(body=[m.Raise()])) for s in st.body.body) and st.orelse is None:
                return None
            body = self._block(list(st.body.body))
            if not body:
                return None
            return st.with_changes(body=st.body.with_changes(body=body), orelse=self._orelse(st.orelse))
        if isinstance(st, (cst.For, cst.While, cst.With)):
            if isinstance(st, cst.For):
                st = self._zip_without_hf(st)
            if isinstance(st, cst.For) and (bound := loop_module(st)) is not None:
                self._loop_vars[bound[0]] = bound[1]
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

    def _zip_without_hf(self, st: cst.For) -> cst.For:
        """`for layer, past in zip(self.layers, past_key_values):` -> `for layer in self.layers:`
        (a tuple cache zipped with the layers: its loop variable is HF-only too)."""
        it, target = st.iter, st.target
        if m.matches(it, m.Call(func=m.Name("enumerate"), args=[m.Arg(m.Call(func=m.Name("zip")), keyword=None)])) \
                and m.matches(target, m.Tuple(elements=[m.Element(m.Name()), m.Element(m.Tuple())])):
            # `for i, (block, past) in enumerate(zip(self.h, past_key_values)):` (4.x GPT-2)
            inner = self._zip_without_hf(st.with_changes(iter=it.args[0].value, target=target.elements[1].value))  # type: ignore[attr-defined]
            new_target = target.elements[1].with_changes(value=inner.target)  # type: ignore[attr-defined]
            return st.with_changes(iter=it.with_changes(args=[it.args[0].with_changes(value=inner.iter)]),  # type: ignore[attr-defined]
                                   target=target.with_changes(elements=[target.elements[0], new_target]))  # type: ignore[attr-defined]
        if not (m.matches(it, m.Call(func=m.Name("zip"))) and isinstance(target, cst.Tuple)
                and len(target.elements) == len(it.args)  # type: ignore[attr-defined]
                and not any(a.star or a.keyword for a in it.args)):  # type: ignore[attr-defined]
            return st
        pairs = list(zip(it.args, target.elements))  # type: ignore[attr-defined]
        kept = [(a, t) for a, t in pairs if not self._is_tainted(a.value)]
        if len(kept) == len(pairs) or not kept:
            return st
        for a, t in pairs:
            if (a, t) not in kept:
                self.tainted.update(assigned_names(t.value))
        if len(kept) == 1:
            return st.with_changes(iter=kept[0][0].value, target=kept[0][1].value)
        args = [a.with_changes(comma=cst.MaybeSentinel.DEFAULT) if i == len(kept) - 1 else a
                for i, (a, _) in enumerate(kept)]
        elts = [t.with_changes(comma=cst.MaybeSentinel.DEFAULT) if i == len(kept) - 1 else t
                for i, (_, t) in enumerate(kept)]
        return st.with_changes(iter=it.with_changes(args=args), target=target.with_changes(elements=elts))

    def _small(self, small: cst.BaseSmallStatement) -> cst.BaseSmallStatement | None:
        if isinstance(small, (cst.Assign, cst.AnnAssign)):
            value = small.value
            targets = [t.target for t in small.targets] if isinstance(small, cst.Assign) else [small.target]
            if value is None:
                return None
            if self._reshape_to_hf_shape(targets, value):
                return None  # `x = x.view(output_shape)`, the shape HF-only: x keeps its (flat) value
            if self._rest_of_single(value):
                # `outputs = attn_outputs[1:]` where the callee now returns its output alone: what
                # followed it in the tuple (cache, weights) was HF-only
                for t in targets:
                    self.tainted.update(assigned_names(t))
                return None
            if self._computed_from_hf(value):
                # `position_ids = torch.arange(past, past + seq_len)` with `past` read from the cache:
                # stripping the function's operands would change what it computes; the value is
                # HF's (the engine passes `positions` itself: that name stays the engine's)
                engine = set(self.ctx.table.rename_params.values())
                bound = {n for t in targets for n in assigned_names(t)}
                if bound & engine:
                    self._hf_positions(value, sorted(bound & engine)[0])
                self.tainted.update(bound)
                return None
            new_value = self._strip_args(value)
            if m.matches(new_value, m.BinaryOperation(left=m.Tuple(), operator=m.Add())) \
                    and self._is_tainted(new_value.right) and not self._is_tainted(new_value.left):  # type: ignore[attr-defined]
                new_value = new_value.left  # type: ignore[attr-defined]  # `(h,) + outputs[1:]`: the port's part
            if isinstance(new_value, cst.Tuple) and any(self._is_tainted(e.value) for e in new_value.elements):
                # `outputs = (attn_output, present)` (4.x): the tuple of what the port computes
                kept = [e for e in new_value.elements if not self._is_tainted(e.value)]
                if kept:
                    kept[-1] = kept[-1].with_changes(comma=cst.Comma() if len(kept) == 1 else cst.MaybeSentinel.DEFAULT)
                    new_value = new_value.with_changes(elements=kept)
            bound = {n for t in targets for n in assigned_names(t)}
            if self._is_tainted(new_value) or ((isinstance(value, cst.Call) or m.matches(value, m.Name("None")))
                                               and bound and bound <= self.ctx.table.strip_params):
                # (or a call binds HF plumbing by name: `attention_mask = self._prepare_mask(...)`;
                # or None does: `encoder_attention_mask = None`)
                for t in targets:
                    self.tainted.update(assigned_names(t))
                return None
            if isinstance(small, cst.Assign) and (narrowed := self._narrow_unpack(small)) is not small:
                small, targets = narrowed, [narrowed.targets[0].target]
            if len(targets) == 1 and isinstance(targets[0], cst.Tuple) and self._single_return_call(value):
                # `out, weights = self.self_attn(...)` where that forward now returns `out` alone:
                # the other names are HF-only (attention weights)
                names = assigned_names(targets[0])
                self.tainted.update(names[1:])
                targets = [cst.Name(names[0])]
            for t in targets:  # a re-bound name is clean again
                self.tainted.difference_update(assigned_names(t))
                self.defined.update(assigned_names(t))
                self._single_names.difference_update(assigned_names(t))
            if len(targets) == 1 and isinstance(targets[0], cst.Name) and self._single_return_call(value):
                self._single_names.add(targets[0].value)
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
                if 1 < len(kept) < len(value.elements) and self._cls and not any(isinstance(e, cst.StarredElement) for e in value.elements):
                    # what its callers unpack narrows with it (PT011 at the unpacking)
                    self.ctx.narrowed_return[self._cls] = (len(value.elements), tuple(
                        i for i, e in enumerate(value.elements) if not self._is_tainted(e.value)))
                    kept[-1] = kept[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
                return small.with_changes(value=self._strip_args(value.with_changes(elements=kept)))
            if self._single_return_call(value):  # `return self.attention(x)`: passes the one tensor on (GPT-Neo)
                self.ctx.single_return.add(self._cls)
            return small.with_changes(value=self._strip_args(value))
        if isinstance(small, cst.Expr):
            if self._is_tainted(small.value):
                return None
            return small.with_changes(value=self._strip_args(small.value))
        return small

    def _rest_of_single(self, value: cst.BaseExpression) -> bool:
        """`x[1:]` where x was bound to a sub-module call that now returns one value."""
        return m.matches(value, m.Subscript(value=m.Name(), slice=[m.SubscriptElement(m.Slice(
            lower=m.Integer("1"), upper=None, step=None))])) and value.value.value in self._single_names  # type: ignore[attr-defined]

    def _narrow_unpack(self, small: cst.Assign) -> cst.Assign:
        """`out, weights, bias = self.attention(...)` where that forward now returns `out, bias`
        (GPT-NeoX-Japanese): the names at the dropped positions are HF-only, the unpacking binds the rest."""
        narrowed = self._narrowed_call(small.value)
        target = small.targets[0].target if len(small.targets) == 1 else None
        if narrowed is None or not isinstance(target, cst.Tuple) or len(target.elements) != narrowed[0]:
            return small
        for i, e in enumerate(target.elements):
            if i not in narrowed[1]:
                self.tainted.update(assigned_names(e.value))
        kept = [e for i, e in enumerate(target.elements) if i in narrowed[1]]
        kept[-1] = kept[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
        return small.with_changes(targets=[small.targets[0].with_changes(target=target.with_changes(elements=kept))])

    def _narrowed_call(self, value: cst.BaseExpression) -> tuple[int, tuple[int, ...]] | None:
        """(HF's count, positions kept) of a sub-module call whose forward now returns fewer values."""
        info = self.ctx.idx.classes.get(self._cls or "")
        func = value.func if isinstance(value, cst.Call) else None  # type: ignore[attr-defined]
        attr = self_attr(func) or (self._loop_vars.get(func.value) if isinstance(func, cst.Name) else None)
        sub = info.submodules.get(attr or "") if info else None
        return self.ctx.narrowed_return.get(sub.ctor) if sub is not None else None

    def _single_return_call(self, value: cst.BaseExpression) -> bool:
        info = self.ctx.idx.classes.get(self._cls or "")
        func = value.func if isinstance(value, cst.Call) else None  # type: ignore[attr-defined]
        # a sub-module, or the loop variable over a module list (`for layer in self.layers: layer(...)`)
        attr = self_attr(func) or (self._loop_vars.get(func.value) if isinstance(func, cst.Name) else None)
        sub = info.submodules.get(attr or "") if info else None
        return sub is not None and sub.ctor in self.ctx.single_return

    def _reshape_to_hf_shape(self, targets: list, value: cst.BaseExpression) -> bool:
        if not (len(targets) == 1 and isinstance(targets[0], cst.Name) and m.matches(value, m.Call(
                func=m.Attribute(value=m.Name(targets[0].value), attr=m.Name("view") | m.Name("reshape"))))):
            return False
        args = value.args  # type: ignore[attr-defined]
        return bool(args) and all(self._is_tainted(a.value) for a in args)

    def _computed_from_hf(self, value: cst.BaseExpression) -> bool:
        """A torch function handed an HF-only operand by position (`torch.arange(past, past +
        seq_len)`, `torch.full((q, past + q), ...)`): unlike a module's plumbing argument, the
        operand is what it computes from."""
        return any((dotted(c.func) or "").startswith("torch.")  # type: ignore[attr-defined]
                   and any(a.keyword is None and not a.star and self._is_tainted(a.value) for a in c.args)  # type: ignore[attr-defined]
                   for c in findall(value, m.Call()))

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
                        not a.star and a.keyword is None for a in updated.args) and \
                        (rule._cls, self_attr(updated.func)) not in rule.ctx.removed_attrs:
                    # (a module another rule removed goes with its call: `self.rotary_emb(seq_len)`)
                    rule._lost_input(original)
                if args:
                    args[-1] = args[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
                return updated.with_changes(args=args)

        return node.visit(_Args())

    def _hf_positions(self, value: cst.BaseExpression, name: str) -> None:
        """The engine's positions bound from HF-only values (`position_ids = torch.arange(past, past +
        seq_len)`, past read from the cache): no rule shows they are the engine's positions."""
        info = self.ctx.idx.classes.get(self._cls or "")
        fwd = info.method("forward") if info else None
        text = code(value)
        node = next((c for c in findall(fwd, m.Call()) if code(c) in text), None) if fwd else None
        raise self.ctx.idx.error(
            f"the positions ({name}) computed by a torch call from HF-only values (the cache length, the "
            "input's shape): no rule shows they are the engine's positions", node,
            construct=f"{self._cls}.forward", rule=self.name)

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
