"""PT061 drop-dead-locals: the rule `DropDeadLocals`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import assigned_names, dotted, findall, self_attr, walk
from porter.passes.base import Example, Rule

_SHAPE_PURE = {"size", "shape", "dim", "view", "reshape", "transpose", "contiguous", "unsqueeze"}


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
        Example(  # an `if` binding only a batch shape nothing reads (remote code's base model)
            "class M(nn.Module):\n    def forward(self, input_ids, inputs_embeds):\n"
            "        if input_ids is not None:\n            b, s = input_ids.shape\n"
            "        else:\n            b, s, _ = inputs_embeds.shape\n"
            "        return self.embed(input_ids)\n",
            "class M(nn.Module):\n    def forward(self, input_ids, inputs_embeds):\n"
            "        return self.embed(input_ids)\n",
        ),
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
        Example(  # in an `if`'s arms: the attention weights HF returned beside a mixer's output
            "class L(nn.Module):\n    def forward(self, h):\n"
            "        if self.kind == 'mamba':\n            h = self.mamba(h)\n            w = None\n"
            "        elif self.kind == 'attention':\n            h = self.attn(h)\n"
            "        else:\n            h = self.mlp(h)\n"
            "        return h\n",
            "class L(nn.Module):\n    def forward(self, h):\n"
            "        if self.kind == 'mamba':\n            h = self.mamba(h)\n"
            "        elif self.kind == 'attention':\n            h = self.attn(h)\n"
            "        else:\n            h = self.mlp(h)\n"
            "        return h\n",
        ),
        Example(  # a local named like an attribute it reads (GPT-2 before 5.0: `device = input_ids.device ...`)
            "class M(nn.Module):\n    def forward(self, ids, embeds):\n"
            "        device = ids.device if ids is not None else embeds.device\n"
            "        return self.embed(ids)\n",
            "class M(nn.Module):\n    def forward(self, ids, embeds):\n"
            "        return self.embed(ids)\n",
        ),
        Example(  # in an arm, a local read only by another dead one (CodeGen's first pipeline stage)
            "class M(nn.Module):\n    def forward(self, ids, h):\n"
            "        if get_pp_group().is_first_rank:\n            x = self.embed(ids)\n"
            "            length = x.shape[1]\n            out_shape = (-1, length, x.size(-1))\n"
            "        else:\n            x = h\n"
            "        return x\n",
            "class M(nn.Module):\n    def forward(self, ids, h):\n"
            "        if get_pp_group().is_first_rank:\n            x = self.embed(ids)\n"
            "        else:\n            x = h\n"
            "        return x\n",
        ),
        Example(  # an `else` that only set a local nobody reads goes (CohereCompass's text positions)
            "class M(nn.Module):\n    def forward(self, h, pos):\n"
            "        if pos.ndim == 3:\n            text = pos[0]\n            pos = pos[1:]\n"
            "        else:\n            text = None\n"
            "        return self.f(h, pos)\n",
            "class M(nn.Module):\n    def forward(self, h, pos):\n"
            "        if pos.ndim == 3:\n            pos = pos[1:]\n"
            "        return self.f(h, pos)\n",
        ),
        Example(  # a mask builder of the HF base class, binding only its own locals (remote code's get_masks)
            "class Base(PreTrainedModel):\n    def get_masks(self, ids):\n        mask = torch.ones(3, 3)\n"
            "        mask.tril_()\n        return mask < 0.5\n\n\n"
            "class M(Base):\n    def forward(self, ids):\n        mask = self.get_masks(ids)\n        return self.f(ids)\n",
            "class Base(PreTrainedModel):\n    def get_masks(self, ids):\n        mask = torch.ones(3, 3)\n"
            "        mask.tril_()\n        return mask < 0.5\n\n\n"
            "class M(Base):\n    def forward(self, ids):\n        return self.f(ids)\n",
        ),
        Example(  # must leave unchanged: the base method changes what it was given in place
            "class Base(PreTrainedModel):\n    def fill(self, ids):\n        ids.zero_()\n        return ids\n\n\n"
            "class M(Base):\n    def forward(self, ids):\n        x = self.fill(ids)\n        return self.f(ids)\n",
            "class Base(PreTrainedModel):\n    def fill(self, ids):\n        ids.zero_()\n        return ids\n\n\n"
            "class M(Base):\n    def forward(self, ids):\n        x = self.fill(ids)\n        return self.f(ids)\n",
        ),
        Example(  # a method only returning what a module function builds (MPT's ALiBi tensor) is pure
            "def build_bias(n, length):\n    bias = torch.arange(1 - length, 1)\n    return bias * n\n\n\n"
            "class M(nn.Module):\n    def build(self, n, length):\n        return build_bias(n, length)\n\n"
            "    def forward(self, h):\n        bias = self.build(self.n, self.length)\n        return self.f(h)\n",
            "def build_bias(n, length):\n    bias = torch.arange(1 - length, 1)\n    return bias * n\n\n\n"
            "class M(nn.Module):\n    def build(self, n, length):\n        return build_bias(n, length)\n\n"
            "    def forward(self, h):\n        return self.f(h)\n",
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
            # and in an `if`'s arms (`attn_weights = None` beside a mixer call; transformers 5.24's
            # GPT-Neo: `attn_implementation = ...` once it keyed the attention table)
            elif isinstance(st, cst.If):
                if not (new := self._in_arms(st, self._set_in_arms(st, reads))).deep_equals(st):
                    body[i] = new
        if body == list(updated.body.body):
            return updated
        self.mark(f"{cls}.{updated.name.value}")
        return updated.with_changes(body=updated.body.with_changes(body=body or [cst.SimpleStatementLine([cst.Pass()])]))

    def _in_arms(self, st: cst.If, reads: dict[str, int]) -> cst.If:
        """ST with the dead locals of each of its arms (`elif`s and `else` too) dropped; an arm keeps
        at least one statement, but an `else` left with none goes."""
        def arm(block: cst.IndentedBlock) -> cst.IndentedBlock:
            inner = self._dead_locals(list(block.body), reads)
            return block.with_changes(body=inner) if inner and len(inner) != len(block.body) else block
        if not isinstance(st.body, cst.IndentedBlock):
            return st
        orelse = st.orelse
        if isinstance(orelse, cst.If):
            orelse = self._in_arms(orelse, reads)
        elif isinstance(orelse, cst.Else) and isinstance(orelse.body, cst.IndentedBlock):
            orelse = None if not self._dead_locals(list(orelse.body.body), reads) else orelse.with_changes(
                body=arm(orelse.body))
        return st.with_changes(body=arm(st.body), orelse=orelse)

    @staticmethod
    def _set_in_arms(st: cst.If, reads: dict[str, int]) -> dict[str, int]:
        """READS, a local the arms set n times (`t = x[0]` / `else: t = None`) counted once as set."""
        sets: dict[str, int] = {}
        for a in findall(st, m.Assign(targets=[m.AssignTarget(m.Name())])):
            sets[a.targets[0].target.value] = sets.get(a.targets[0].target.value, 0) + 1  # type: ignore[attr-defined]
        return {n: c - (sets[n] - 1 if sets.get(n, 0) > 1 else 0) for n, c in reads.items()}

    @staticmethod
    def _reads(body: list[cst.BaseStatement]) -> dict[str, int]:
        reads: dict[str, int] = {}
        for st in body:
            for n in _variables(st):
                reads[n] = reads.get(n, 0) + 1
        return reads

    def _dead_locals(self, body: list[cst.BaseStatement],
                     outer: dict[str, int] | None = None) -> list[cst.BaseStatement]:
        """`body` without its dead assignments; `outer`: the reads of the enclosing method (a
        loop body's local may be read after the loop)."""
        changed = True
        removed: list[cst.BaseStatement] = []
        while changed:
            changed = False
            # the enclosing method's reads, less those of what is gone (`output_shape = (-1, seq_length, ...)`
            # read the `seq_length` before it)
            reads = self._reads(body) if outer is None else {
                n: c - self._reads(removed).get(n, 0) for n, c in outer.items()}
            new_body = []
            for st in body:
                if m.matches(st, m.SimpleStatementLine(body=[m.Assign()])):
                    assign = st.body[0]  # type: ignore[attr-defined]
                    names = [n for t in assign.targets for n in assigned_names(t.target) if n != "_"]
                    value_reads = set(_variables(assign.value))
                    own = sum(1 for t in assign.targets for n in findall(t.target, m.Name()) if n.value != "_")  # type: ignore[attr-defined]
                    if m.matches(assign, m.Assign(targets=[m.AssignTarget(m.Name())], value=m.Name())) and \
                            assign.targets[0].target.value == assign.value.value:
                        changed = True
                        removed.append(st)
                        continue
                    if names and all(reads.get(n, 0) <= (1 if n not in value_reads else 2) for n in names) \
                            and own == len(names) and self._pure(assign.value):
                        changed = True
                        removed.append(st)
                        continue
                if isinstance(st, cst.If) and self._dead_if(st, reads):
                    changed = True
                    removed.append(st)
                    continue
                new_body.append(st)
            body = new_body
        return body

    def _dead_if(self, st: cst.If, reads: dict[str, int]) -> bool:
        """An `if` whose every arm only binds locals nothing reads after it, from pure values, under a
        pure test (`if input_ids is not None: batch_size, seq_length = input_ids.shape else: ...`,
        a batch shape the engine's flat tokens do not have)."""
        arms, node = [], st
        while isinstance(node, cst.If):
            arms.append(node.body)
            if not self._pure(node.test):
                return False
            node = node.orelse
        if isinstance(node, cst.Else):
            arms.append(node.body)
        names: set[str] = set()
        for block in arms:
            for s in getattr(block, "body", [None]):
                if not m.matches(s, m.SimpleStatementLine(body=[m.Assign()])) or not self._pure(s.body[0].value):  # type: ignore[union-attr]
                    return False
                names |= {n for t in s.body[0].targets for n in assigned_names(t.target)}  # type: ignore[union-attr]
        inside = self._reads([st])
        return bool(names) and all(reads.get(n, 0) - inside.get(n, 0) <= 0 for n in names)

    def _pure(self, value: cst.BaseExpression) -> bool:
        for call in findall(value, m.Call()):
            func = call.func  # type: ignore[attr-defined]
            if isinstance(func, cst.Attribute) and func.attr.value in _SHAPE_PURE:
                continue
            if dotted(func) in self.ctx.table.hf_only_callables:  # HF plumbing queries (rules/hf_strip.yaml)
                continue
            if self._pure_builder(func):
                continue
            return False
        return True

    def _pure_builder(self, func: cst.BaseExpression) -> bool:
        """`self.build_mpt_alibi_tensor(...)`: a method of the class that only returns what a function
        of the module builds, a function that binds only its own locals (MPT's ALiBi tensor, once
        the engine's Attention takes its slopes and nothing reads the tensor)."""
        attr = self_attr(func)
        info = self.ctx.idx.classes.get(self.current_class or "")
        meth = info.method(attr) if info is not None and attr else None
        if meth is None and info is not None and attr and attr not in info.submodules:
            return self._local_only_base_method(info, attr)
        if meth is None or attr in info.submodules:  # type: ignore[union-attr]
            return False
        body = [st for st in meth.body.body if not m.matches(st, m.SimpleStatementLine(body=[m.Expr(m.SimpleString())]))]
        if len(body) != 1 or not m.matches(body[0], m.SimpleStatementLine(body=[m.Return(m.Call(func=m.Name()))])):
            return False
        fn = self.ctx.idx.functions.get(body[0].body[0].value.func.value)  # type: ignore[attr-defined]
        if fn is None:
            return False
        return not findall(fn, m.AugAssign() | m.AssignTarget(target=m.Attribute() | m.Subscript()) | m.Global()
                           | m.Nonlocal())

    def _local_only_base_method(self, info, attr: str) -> bool:
        """`self.get_masks(input_ids)`, a method of the HF base class (its PreTrainedModel, which the port
        does not keep) that binds only its own locals and changes nothing it was given (no attribute or
        item assignment, no in-place call on a parameter): remote code's mask builder."""
        for base in info.bases:
            owner = self.ctx.idx.classes.get(base)
            meth = owner.method(attr) if owner is not None else None
            if meth is None:
                continue
            params = {p.name.value for p in meth.params.params}
            if findall(meth, m.AugAssign() | m.AssignTarget(target=m.Attribute() | m.Subscript()) | m.Global()
                       | m.Nonlocal()):
                return False
            for call in findall(meth, m.Call(func=m.Attribute())):
                f = call.func  # type: ignore[attr-defined]
                if f.attr.value.endswith("_") and not f.attr.value.startswith("__") and (
                        not isinstance(f.value, cst.Name) or f.value.value in params):
                    return False
            return True
        return False


def _variable_parts(node: cst.CSTNode) -> list[cst.CSTNode] | None:
    """What of NODE can hold a variable: of an attribute only its value (`x.device`: not `device`),
    of an argument only its value (not its keyword)."""
    if isinstance(node, (cst.Attribute, cst.Arg)):
        return [node.value]
    return None


def _variables(node: cst.CSTNode) -> list[str]:
    """The names a node uses as variables, in order: not an attribute's name nor a keyword's."""
    return [n.value for n in walk(node, _variable_parts) if type(n) is cst.Name]  # type: ignore[attr-defined]
