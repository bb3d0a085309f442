"""Planning one attention class (and the gate/up pair of an MLP): which projections are q, k, v
and o, how a packed projection is laid out, the heads, the scale, the rotary. A mixin of the
`Planner` (porter/plan/planner.py), which holds the index and the strip table."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.blocked_qkv import blocked_split
from porter.analysis.cstutil import code, findall, names_in, param_names, resolve_cross_attention, self_call_attr
from porter.analysis.qkv_layout import fused_layout
from porter.analysis.index import ClassInfo, ModelIndex
from porter.analysis.kv_sharing import kv_sharing
from porter.analysis.layer_rope import layer_rope
from porter.analysis.reversed_rope import sign_cancels, turns_back
from porter.analysis.rotary_module import pairs_last
from porter.analysis.layouts import (
    head_size_attr, heads_of, init_attrs, linear_args, local_bindings, packed_split_call,
    per_head_split_helper, query_prescale, rope_guard, scale_in_head_size, split_head_size,
    thirds_to_front,
)
from porter.plan import refusals
from porter.plan.model import AttentionPlan, GateUpPlan
from porter.rules_data import StripTable


class AttentionPlanning:
    idx: ModelIndex
    table: StripTable

    def attention_call_names(self) -> set[str]:  # (the Planner's, cached)
        raise NotImplementedError

    # -- q/k/v -----------------------------------------------------------------------------------
    def packed_sizes(self, info: ClassInfo, call: cst.Call, qkv: list[str]):
        """(interleaved, grouped, blocked, (heads, kv heads)) of one projection packing q, k and v."""
        interleaved = self.chunked_per_head(info, qkv[0])
        grouped = blocked = None
        if interleaved:
            _, out_f, _ = linear_args(info.submodules[qkv[0]].call)
            node = cst.parse_expression(out_f)
            per = code(node.right) if isinstance(node, cst.BinaryOperation) and isinstance(
                node.operator, cst.Multiply) and code(node.left) == "3" else f"({out_f}) // 3"
            heads = heads_of(per, head_size_attr(info))
            return interleaved, grouped, None, (heads, heads)
        if (grouped := self.grouped_sizes(info, qkv[0], call)) is not None:
            return interleaved, grouped, None, grouped
        if self.chunked_flat(info, qkv[0]) or (blocked := blocked_split(info, qkv[0], call)) is not None:
            # thirds of the output (MPT's chunk(3)), or CodeGen's mp_num blocks
            _, out_f, _ = linear_args(info.submodules[qkv[0]].call)
            node = cst.parse_expression(out_f)  # `self.embed_dim * 3`
            three = [code(x) == "3" for x in (node.left, node.right)] if isinstance(node, cst.BinaryOperation) \
                and isinstance(node.operator, cst.Multiply) else [False, False]
            per = code(node.left) if three[1] else code(node.right) if three[0] else f"({out_f}) // 3"  # type: ignore[attr-defined]
            heads = heads_of(per, head_size_attr(info))
            return interleaved, grouped, (blocked.blocks, *blocked.slots) if blocked else None, (heads, heads)
        sizes = self.packed_qkv_sizes(info, qkv[0]) or self.grouped_sizes(info, qkv[0], call, kind="flat")
        if sizes is None:
            raise refusals.PACKED_NOT_SLICED.error(self, call, f"{info.name}.forward")  # type: ignore[arg-type]
        return interleaved, grouped, None, sizes

    def packed_qkv_sizes(self, info: ClassInfo, attr: str) -> tuple[str, str] | None:
        """Heads and KV heads of a packed q/k/v projection, read from how forward slices it.

        `qkv = self.qkv_proj(x); q = qkv[..., :Q]; k = qkv[..., Q : Q + K]; v = qkv[..., Q + K :]`
        with Q = heads * head_dim and K = kv_heads * head_dim.
        """
        fwd = info.method("forward")
        local = local_bindings(fwd)
        out_name = next((n for n, v in local.items() if m.matches(v, m.Call(
            func=m.Attribute(value=m.Name("self"), attr=m.Name(attr))))), None)
        if out_name is None:
            return self.split_qkv_sizes(info, attr)

        def resolve(e: cst.BaseExpression) -> str:
            return code(local[e.value]) if isinstance(e, cst.Name) and e.value in local else code(e)

        slices = []
        for node in findall(fwd, m.Subscript(value=m.Name(out_name))):
            sl = node.slice[-1].slice  # type: ignore[attr-defined]
            if isinstance(sl, cst.Slice):
                slices.append(sl)
        first = next((s_ for s_ in slices if s_.lower is None and s_.upper is not None), None)
        mid = next((s_ for s_ in slices if s_.lower is not None and s_.upper is not None), None)
        if first is None or mid is None:
            return self.split_qkv_sizes(info, attr)
        q_size = resolve(first.upper)
        upper = mid.upper
        if not (isinstance(upper, cst.BinaryOperation) and isinstance(upper.operator, cst.Add)):
            return None
        kv_size = code(upper.right)
        return heads_of(q_size, "self.head_dim"), heads_of(kv_size, "self.head_dim")

    def grouped_sizes(self, info: ClassInfo, attr: str, call: cst.Call, kind: str = "grouped") -> tuple[str, str] | None:
        """Heads and KV heads of a packed projection grouped per KV head (or flat [q; k; v] split
        other than by slices or sizes: KIND "flat"), as forward computes it
        (porter/analysis/qkv_layout.py): the KV heads from its width, H + 2 * KV heads of head_dim."""
        hd = head_size_attr(info)
        in_f, out_f, _ = linear_args(info.submodules[attr].call)
        layout = fused_layout(info, attr, call, hd, (in_f, out_f))
        if layout is None or layout.kind != kind:
            return None
        out = out_f if isinstance(cst.parse_expression(out_f), (cst.Name, cst.Attribute)) else f"({out_f})"
        return layout.num_heads, f"({out} // {hd} - {layout.num_heads}) // 2"

    def split_qkv_sizes(self, info: ClassInfo, attr: str) -> tuple[str, str] | None:
        """`q, k, v = self.c_attn(x).split((Q, K, K), dim=-1)` (or a list of the three sizes), with
        Q = heads * head_dim and K = kv_heads * head_dim: heads and KV heads."""
        fwd = resolve_cross_attention(info.method("forward"), self.table.cross_attention_flags)
        local = local_bindings(fwd)  # `qkv = self.c_attn(x)` then `q, k, v = qkv.split(...)`: the same split
        bound = {n for n, v in local.items() if self_call_attr(v) == attr}
        for st in findall(fwd, m.SimpleStatementLine()):
            call = packed_split_call(st, attr) or _split_of_name(st, bound)
            if call is None or not call.args:
                continue
            sizes = call.args[0].value
            hd = head_size_attr(info)
            if isinstance(sizes, (cst.Tuple, cst.List)) and len(sizes.elements) == 3:
                q, k, v = (code(e.value) for e in sizes.elements)
                if k == v:
                    return heads_of(q, hd), heads_of(k, hd)
            elif isinstance(sizes, (cst.Name, cst.Attribute)):  # `.split(self.split_size)` into three equal parts
                return heads_of(code(sizes), hd), heads_of(code(sizes), hd)
        return None

    def per_head_unless(self, info: ClassInfo, attr: str) -> str | None:
        """`if self.flag: q, k, v = <split by sizes> else: q, k, v = self.attr(x).view(..., heads,
        3 * head_dim)...split(...)`: the packed weight is per head interleaved unless `self.flag`."""
        fwd = resolve_cross_attention(info.method("forward"), self.table.cross_attention_flags)
        for node in findall(fwd, m.If(test=m.Attribute(value=m.Name("self"), attr=m.Name()))):
            orelse = node.orelse  # type: ignore[attr-defined]
            if orelse is None or isinstance(orelse, cst.If):
                continue
            body_split = [c for st in node.body.body if (c := packed_split_call(st, attr)) is not None]  # type: ignore[attr-defined]
            else_split = [c for st in orelse.body.body if (c := packed_split_call(st, attr)) is not None]
            if not (body_split and else_split):
                continue
            views = findall(else_split[0], m.Call(func=m.Attribute(attr=m.Name("view"))))
            if any(findall(c.args[-1].value, m.BinaryOperation(operator=m.Multiply(), left=m.Integer("3")))  # type: ignore[attr-defined]
                   for c in views if c.args):  # type: ignore[attr-defined]
                return node.test.attr.value  # type: ignore[attr-defined]
        return None

    def chunked_per_head(self, info: ClassInfo, attr: str) -> bool:
        """`qkv = self.proj(x).view(..., -1, 3 * head); q, k, v = qkv.chunk(3, dim=-1)`: q/k/v
        interleaved per head in the projection (GPT-NeoX layout)."""
        fwd = info.method("forward")
        local = local_bindings(fwd)
        out_name = next((n for n, v in local.items() if findall(v, m.Call(
            func=m.Attribute(value=m.Name("self"), attr=m.Name(attr))))), None)
        if out_name is None:
            return False
        if findall(fwd, m.Call(func=m.Attribute(value=m.Name(out_name), attr=m.Name("chunk")),
                               args=[m.Arg(m.Integer("3")), m.ZeroOrMore()])):
            # per head only through a view by heads first; a chunk of the flat output is [q; k; v] (MPT)
            return not self.chunked_flat(info, attr)
        return per_head_split_helper(info, attr) is not None

    def chunked_flat(self, info: ClassInfo, attr: str) -> bool:
        """`qkv = self.proj(x)` (maybe clamped: MPT's clip_qkv) and `q, k, v = qkv.chunk(3, dim=2)`
        with no view in between: the projection's output is [q; k; v], thirds of it."""
        fwd = info.method("forward")
        views = m.Call(func=m.Attribute(attr=m.Name("view") | m.Name("reshape") | m.Name("unflatten")))
        names = {a.targets[0].target.value for a in findall(fwd, m.Assign(targets=[m.AssignTarget(m.Name())]))  # type: ignore[attr-defined]
                 if findall(a.value, m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(attr))))}  # type: ignore[attr-defined]
        binds = [a for a in findall(fwd, m.Assign(targets=[m.AssignTarget(m.Name())]))
                 if a.targets[0].target.value in names]  # type: ignore[attr-defined]
        chunks = findall(fwd, m.Call(func=m.Attribute(value=m.Name(m.MatchIfTrue(lambda n: n in names)), attr=m.Name("chunk")),
                                     args=[m.Arg(m.Integer("3")), m.ZeroOrMore()]))
        if any(thirds_to_front(a.value, a.targets[0].target.value) for a in binds[1:]):  # type: ignore[attr-defined]
            return True  # `proj = proj.unflatten(-1, (3, H))...`, thirds to the front (Baichuan)
        return bool(binds and chunks) and not any(findall(a.value, views) for a in binds)  # type: ignore[attr-defined]

    # -- the attention -----------------------------------------------------------------------------
    def attention_plan(self, info: ClassInfo, call: cst.Call, qkv: list[str], o: str | None) -> AttentionPlan:
        attrs = init_attrs(info)
        head_attr = next((a for a in ("head_dim", "head_size") if a in attrs), None)
        hd = f"self.{head_attr}" if head_attr else split_head_size(info)
        if hd is None:
            raise refusals.NO_HEAD_SIZE.error(self, info.node, f"class {info.name}")  # type: ignore[arg-type]
        q_in, q_out, bias = linear_args(info.submodules[qkv[0]].call)
        _, k_out, _ = linear_args(info.submodules[qkv[1]].call)
        kw = {a.keyword.value: code(a.value) for a in call.args if a.keyword is not None}
        fwd = info.method("forward")
        refusals.reused_attention(self, info, fwd)  # type: ignore[arg-type]
        share = kv_sharing(fwd, set(self.table.strip_params))  # type: ignore[arg-type]
        if share is None or share.writer is None:
            refusals.shared_kv(self, info, fwd)  # type: ignore[arg-type]
        # PT029 folds the product into the op (one projection per tensor only: a packed one's
        # product would scale k and v too)
        if len(set(qkv)) == 3 and (pre := query_prescale(fwd, qkv[0], call)) is not None:
            kw["scaling"] = code(pre[2])
        rope_helper, rope, rope_theta, rope_dim = self.rotary(info, fwd)
        per_layer = self.layer_rope_choice(info, fwd, rope_helper)
        reversed_rope = rope == "neox" and self.rotary_reversed(info, rope_helper)
        return AttentionPlan(
            cls=info.name,
            q=qkv[0],
            k=qkv[1],
            v=qkv[2],
            o=o,
            head_dim=hd,
            num_heads=heads_of(q_out, hd),
            num_kv_heads=heads_of(k_out, hd),
            hidden_size=q_in,
            bias=bias,
            scale=scale_in_head_size(kw.get("scaling", f"{hd}**-0.5"), call, hd),
            sliding_window=kw.get("sliding_window"),
            softcap=kw.get("softcap"),
            sinks=kw.get("s_aux"),
            rope=rope,
            rope_helper=rope_helper,
            line=info.line,
            alibi=kw.get("alibi"),
            alibi_scale=kw.get("alibi_scale"),
            rope_theta=rope_theta,
            rope_dim=rope_dim,
            rope_when=per_layer.when if per_layer else None,
            rope_params=per_layer.params if per_layer else None,
            rope_tables=f"{per_layer.model_cls}.{per_layer.tables[0]}" if per_layer and per_layer.tables else None,
            rope_reversed=reversed_rope,
            kv_shared_when=share.shared_when if share else None,
            kv_read_key=share.read_key if share else None,
            kv_write_when=share.write_when if share else None,
            kv_write_key=share.write_key if share else None,
            kv_param=share.param if share else None,
        )

    # -- rotary ----------------------------------------------------------------------------------
    def rotary(self, info: ClassInfo, fwd: cst.FunctionDef):
        """(helper, "neox" | "gptj" | None, theta, dims) of the rotary an attention's forward applies."""
        rope_helper = None
        for c in findall(fwd, m.Call(func=m.Name())):
            fname = c.func.value  # type: ignore[union-attr]
            if fname in self.idx.functions and "rotary" in code(self.idx.functions[fname]).lower() \
                    and fname not in self.attention_call_names():
                rope_helper = fname
        rope = None
        rope_theta = rope_dim = None
        if rope_helper and len(param_names(self.idx.functions[rope_helper])) < 4 and \
                (sinusoid := self.sinusoidal_rope(info, rope_helper)) is not None:
            rope_theta, rope_dim = sinusoid
        elif rope_helper and len(param_names(self.idx.functions[rope_helper])) < 4 and \
                (built := self.module_rope()) is not None:
            rope_theta, rope_dim = built  # one tensor per call from remote code's cache module (ChatGLM)
        elif rope_helper and len(param_names(self.idx.functions[rope_helper])) < 4:
            call = next(c for c in findall(fwd, m.Call(func=m.Name(rope_helper))))
            how = ("q and k each viewed as complex pairs and multiplied by a complex table"
                   if findall(self.idx.functions[rope_helper], m.Attribute(attr=m.Name("view_as_complex")))
                   else "q and k rotated separately, cos/sin from a sinusoidal buffer")
            raise refusals.ROTARY_PER_TENSOR.error(self, call, f"{info.name}.forward: {rope_helper}", how=how)  # type: ignore[arg-type]
        if rope_helper and (guard := rope_guard(fwd, rope_helper, self.table.strip_params)) is not None and \
                self.layer_rope_choice(info, fwd, rope_helper) is None:
            # the test goes with the HF plumbing (PT011 drops the whole block): no layer would rotate
            raise refusals.ROTARY_UNDER_HF_TEST.error(self, guard, f"{info.name}.forward: if {code(guard.test)}")  # type: ignore[arg-type]
        if rope_helper:
            rope = self.rotary_style(rope_helper)
            if rope_theta is None and (built := self.module_rope()) is not None:
                rope_theta, rope_dim = built  # a cos/sin cache module of remote code, built from config
        if rope and "config" not in param_names(info.method("__init__")):
            raise refusals.ROTARY_WITHOUT_CONFIG.error(self, info.node, f"class {info.name}")  # type: ignore[arg-type]
        return rope_helper, rope, rope_theta, rope_dim

    def module_rope(self) -> tuple[str, str] | None:
        """(base, dims) of a rotary module computing its inverse frequencies from constructor
        arguments the model passes from config (porter/analysis/rotary_module.py)."""
        from porter.analysis.rotary_module import module_rope

        from porter.analysis.rotary_module import value_arguments
        from porter.plan.rotary_refusals import ROTARY_MODULE_VALUE_ARG

        classes = [n for n, c in self.idx.classes.items() if self.is_rotary(c)]  # type: ignore[attr-defined]
        built = module_rope(self.idx, classes)
        if built is not None:
            for call, owner, cls, param in value_arguments(self.idx, classes):
                raise ROTARY_MODULE_VALUE_ARG.error(self, call, f"{owner}: {code(call)}", cls=cls, param=param)  # type: ignore[arg-type]
        return built

    def rotary_style(self, rope_helper: str) -> str:
        """"gptj" (pairs of adjacent dims: a `::2` slice in the helper or what it calls), else
        "neox" (halves); a `rotate_half` that turns the other way is `rotary_reversed`'s."""
        rope = "neox"
        helper_text = code(self.idx.functions[rope_helper])
        rot = self.idx.functions.get("rotate_half")
        called = [self.idx.functions[c.func.value] for c in findall(self.idx.functions[rope_helper], m.Call(  # type: ignore[attr-defined]
            func=m.Name())) if c.func.value in self.idx.functions]  # type: ignore[attr-defined]
        if "::2" in helper_text or (rot is not None and "::2" in code(rot)) or any("::2" in code(f) for f in called) \
                or pairs_last(self.idx.functions[rope_helper]):
            rope = "gptj"
        return rope

    def rotary_reversed(self, info: ClassInfo, rope_helper: str | None) -> bool:
        """A `rotate_half` returning (x2, -x1) turns the other way round from the engine's (-x2, x1):
        True when a sign folded into q/k cancels (PT241), else the refusal."""
        cat = turns_back(self.idx.functions.get("rotate_half"))
        if cat is None or rope_helper is None:
            return False
        if not sign_cancels(self.idx, info, rope_helper, self.attention_call_names(), self.table.strip_params):
            raise refusals.ROTARY_OTHER_WAY.error(self, cat, f"rotate_half: {code(cat)}")  # type: ignore[arg-type]
        return True

    def layer_rope_choice(self, info: ClassInfo, fwd: cst.FunctionDef, rope_helper: str | None):
        """The per-layer rotary choice behind `if position_embeddings is not None:` (PT240), or None."""
        guard = rope_guard(fwd, rope_helper, self.table.strip_params) if rope_helper else None
        hf = names_in(guard.test) & set(self.table.strip_params) if guard is not None else set()
        if len(hf) != 1 or "layer_idx" not in param_names(info.method("__init__")):  # type: ignore[arg-type]
            return None
        return layer_rope(self.idx, info.name, hf.pop(), self.is_rotary)  # type: ignore[attr-defined]

    def sinusoid_theta(self, info: ClassInfo) -> str | None:
        """The base of a sinusoidal rotary table `__init__` builds (`self.t = nn.Buffer(make(max_pos, dim))`
        where make computes `THETA ** (torch.arange(0, dim, 2) / dim)` and a `.sin`)."""
        init = info.method("__init__")
        for node in findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))],
                                           value=m.Call())) if init else []:
            for c in findall(node.value, m.Call(func=m.Name())):  # type: ignore[attr-defined]
                fn = self.idx.functions.get(c.func.value)  # type: ignore[attr-defined]
                pows = findall(fn, m.BinaryOperation(left=m.Integer() | m.Float(), operator=m.Power())) if fn else []
                if fn is not None and pows and findall(fn, m.Call(func=m.Attribute(attr=m.Name("sin")))):
                    return code(pows[0].left)  # type: ignore[attr-defined]
        return None

    def sinusoidal_rope(self, info: ClassInfo, helper: str) -> tuple[str, str] | None:
        """(theta, rotary dims) of a rotary applied one tensor per call (`k_rot = helper(k_rot, sin, cos)`)
        from a sinusoidal table built in `__init__` (`self.embed_positions = nn.Buffer(make_table(max_pos,
        dim))`, where make_table computes `1.0 / (THETA ** (torch.arange(0, dim, 2) / dim))`).
        The rotary dims: the bound of the slice the helper's input is cut with (`key[..., : self.rotary_dim]`),
        `or` the head size when an `if X is not None` chooses between the slice and the whole head."""
        fwd = info.method("forward")
        # the table: built by this attention, or by the rotary module that hands it sin/cos (transformers 5.24)
        theta = self.sinusoid_theta(info) or next(
            (t for c in self.idx.classes.values() if (t := self.sinusoid_theta(c))), None)
        if theta is None or fwd is None:
            return None
        rotated = {code(c.args[0].value) for c in findall(fwd, m.Call(func=m.Name(helper)))}  # type: ignore[attr-defined]
        local = local_bindings(fwd)
        dims = None
        for name in sorted(rotated):
            value = local.get(name)
            if isinstance(value, cst.Subscript) and isinstance(sl := value.slice[-1].slice, cst.Slice) \
                    and sl.lower is None and sl.upper is not None:
                dims = code(sl.upper)
        hd = head_size_attr(info)
        if dims is None:
            return theta, hd
        guarded = findall(fwd, m.If(test=m.Comparison(left=m.MatchIfTrue(lambda e: code(e) == dims),
                                                       comparisons=[m.ComparisonTarget(m.IsNot(), m.Name("None"))])))
        return theta, f"{dims} or {hd}" if guarded else dims

    # -- MLP -------------------------------------------------------------------------------------
    def merged_outputs(self, fwd: cst.FunctionDef, attr: str, info: ClassInfo | None = None) -> int | None:
        """`y = self.proj(x); a, b = y.chunk(2, dim=-1)`, or `a, b = self.proj(x).chunk(2, dim=-1)`
        (ModernBERT's Wi): a column projection packing 2 outputs."""
        for node in findall(fwd, m.Call(func=m.Attribute(value=m.Call(
                func=m.Attribute(value=m.Name("self"), attr=m.Name(attr))), attr=m.Name("chunk")))):
            args = node.args  # type: ignore[attr-defined]
            if args and isinstance(args[0].value, cst.Integer):
                return int(args[0].value.value)
        local = local_bindings(fwd)
        out_name = next((n for n, v in local.items() if m.matches(v, m.Call(
            func=m.Attribute(value=m.Name("self"), attr=m.Name(attr))))), None)
        if out_name is None:
            return None
        for node in findall(fwd, m.Call(func=m.Attribute(value=m.Name(out_name), attr=m.Name("chunk")))):
            args = node.args  # type: ignore[attr-defined]
            if args and isinstance(args[0].value, cst.Integer):
                return int(args[0].value.value)
        return self._chunked_by_function(fwd, out_name, info) if info is not None else None

    def _chunked_by_function(self, fwd: cst.FunctionDef, out_name: str, info: ClassInfo) -> int | None:
        """The projection's output handed to `self.activation_func`, bound in __init__ to a function of
        the module that chunks its argument (`torch.chunk(x, 2, dim=-1)` or `x.chunk(2, ...)`: ChatGLM's
        `swiglu`): the projection packs that many outputs."""
        bound = init_attrs(info)
        for call in findall(fwd, m.Call(func=m.Attribute(value=m.Name("self")), args=[m.Arg(m.Name(out_name))])):
            value = bound.get(call.func.attr.value)  # type: ignore[attr-defined]
            fn = self.idx.functions.get(value.value) if isinstance(value, cst.Name) else None
            params = [p.name.value for p in fn.params.params] if fn is not None else []
            if not params:
                continue
            x = params[0]
            for c in findall(fn, m.Call(func=m.Attribute(value=m.Name("torch"), attr=m.Name("chunk")),
                                        args=[m.Arg(m.Name(x)), m.Arg(m.Integer()), m.ZeroOrMore()])):
                return int(c.args[1].value.value)  # type: ignore[attr-defined]
            for c in findall(fn, m.Call(func=m.Attribute(value=m.Name(x), attr=m.Name("chunk")),
                                        args=[m.Arg(m.Integer()), m.ZeroOrMore()])):
                return int(c.args[0].value.value)  # type: ignore[attr-defined]
        return None

    def gate_up_pattern(self, info: ClassInfo, fwd: cst.FunctionDef, roles: dict[str, str]) -> GateUpPlan | None:
        for node in findall(fwd, m.BinaryOperation(operator=m.Multiply())):
            assert isinstance(node, cst.BinaryOperation)
            for act_side, up_side in ((node.left, node.right), (node.right, node.left)):
                if not (isinstance(act_side, cst.Call) and len(act_side.args) == 1):
                    continue
                act = self_call_attr(act_side)
                gate = self_call_attr(act_side.args[0].value)
                up = self_call_attr(up_side)
                if not (act and gate and up) or roles.get(gate) != "column" or roles.get(up) != "column":
                    continue
                if code(act_side.args[0].value.args[0].value) != code(up_side.args[0].value):  # type: ignore[union-attr]
                    continue
                act_sub = info.submodules.get(act)
                if act_sub is None and act not in init_attrs(info):
                    continue
                return GateUpPlan(info.name, gate, up, act, info.line)
        return None


def _split_of_name(st: cst.CSTNode, names: set[str]) -> cst.Call | None:
    """`q, k, v = qkv.split(ARG, dim=...)` where `qkv` is one of NAMES (bound to the projection)."""
    if not m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Tuple(
            elements=[m.Element(m.Name()), m.Element(m.Name()), m.Element(m.Name())]))], value=m.Call(
                func=m.Attribute(value=m.Name(), attr=m.Name("split"))))])):
        return None
    call = st.body[0].value  # type: ignore[attr-defined]
    return call if call.func.value.value in names else None
