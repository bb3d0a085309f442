"""PT150 inline-eager-attention: the rule `InlineEagerAttention`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.causal_buffer import buffer_of, causal_buffers, mask_fill
from porter.analysis.cstutil import code, dotted, findall, names_in, self_call_attr
from porter.passes.attention._common import BeforeIndexRule, nlines
from porter.passes.attention._inline_dataflow import (
    _MATMUL_FUNCS, SOFTMAX, _blend, _bound_once, adds_nothing, baddbmm_input, _matmul, _mul, _query_row_arm, _raise_check,
    _reads, _root, _simple_assign, _target, _tensor_roots, _writes,
)
from porter.passes.attention._inline_examples import EXAMPLES
from porter.rules_data import strip_table

def _floor_at_min(value: cst.BaseExpression) -> bool:
    """`torch.max(w, torch.tensor(torch.finfo(w.dtype).min, ...))` (or `torch.full((), ...)`, or
    `torch.clamp(w, min=...)`): the scores floored at the dtype's lowest value."""
    if not isinstance(value, cst.Call) or dotted(value.func) not in ("torch.max", "torch.maximum", "torch.clamp"):
        return False
    floor = [a.value for a in value.args[1:] if a.keyword is None or a.keyword.value in ("other", "min")]
    return len(floor) == 1 and mask_fill(floor[0])


class InlineEagerAttention(BeforeIndexRule):
    code = "PT150"
    name = "inline-eager-attention"
    why = (
        "Older models compute attention inline: `scores = q @ k.transpose(-1, -2)` (or `torch.matmul`, "
        "`torch.bmm`, or an ALiBi bias's `baddbmm`), a scale, the mask added, `softmax`, dropout, and the "
        "weighted sum with v, then a merge of the heads. The region is found by dataflow from the "
        "softmax: backwards to the matmul of the scores and the shape-only rebindings of q, k and v, "
        "forwards to the weighted sum and what only reshapes it. It becomes one call "
        "`out, weights = attention_interface(self, q, k, v, mask, scaling=S)` on the tensors as they "
        "were before the region, so the planner and the engine-attention rule treat it like any "
        "attention call. The scale is the product of what multiplies (or divides) the scores before "
        "the softmax; a bias added to the scores that is not the mask is an ALiBi bias, passed as "
        "`alibi=` (with `alibi_scale=` when the scale is applied after it). BART-era files (XGLM, OPT "
        "4.x) floor the masked scores at the dtype's lowest value (`torch.max(w, finfo.min)`): their "
        "additive mask holds 0 where a key is seen and finfo.min where it is not, so the floor leaves "
        "every seen score as it is and turns the masked ones (which may have overflowed to -inf) into "
        "finfo.min, whose exponential in the softmax is 0 exactly as the engine's causal mask gives, "
        "with the diagonal always seen no row is all masked: the step maps to nothing. A weights name "
        "bound to None in the region (OPT 4.x, after PT222) is what the call binds its weights to."
    )
    visits_dropped_code = True
    word = "softmax"  # before indexing: only the top-level statements naming it are walked

    examples = EXAMPLES

    def visit_ClassDef(self, node):
        self._methods = {st.name.value for st in node.body.body if isinstance(st, cst.FunctionDef)}
        self._dropouts: set[str] = set()
        self._region_calls: set[str] = set()
        self._helpers: dict[str, tuple[list[cst.Param], cst.Call]] = {}
        self._packs: dict[str, str] = {}  # helper -> "list" | "tuple": it returns its output packed
        self._buffers = causal_buffers(node)
        for a in findall(node, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))],
                                        value=m.Call(func=m.Attribute(attr=m.Name("Dropout")) | m.Name("Dropout")))):
            self._dropouts.add(a.targets[0].target.attr.value)  # type: ignore[attr-defined]
        return super().visit_ClassDef(node)

    def leave_IndentedBlock(self, original, updated):
        if len(self.scope) < 2:
            return updated
        body = list(updated.body)
        new = self.rewrite_block(body, self._params)
        return updated if new is None else updated.with_changes(body=new)

    def leave_FunctionDef(self, original, updated):
        if len(self.scope) == 2:
            self._note_attention_helper(updated)
        return super().leave_FunctionDef(original, updated)

    def _note_attention_helper(self, fn: cst.FunctionDef) -> None:
        """A method that now only returns an attention call (`a, w = attention_interface(self, q, k, v, mask, ...)`,
        `return a, w`: GPT-J's `_attn`): its callers in the class get the call itself."""
        body = [st for st in fn.body.body if not m.matches(st, m.SimpleStatementLine(body=[m.Expr(m.SimpleString())]))]
        body = [st for i, st in enumerate(body) if not self._dead_pure(st, body[i + 1:])]
        flags = set(strip_table().strip_params) & {x.name.value for x in fn.params.params}
        body = [st for st in body if not (isinstance(st, cst.If) and st.orelse is None  # `if output_attentions:`
                                          and m.matches(st.test, m.Name(m.MatchIfTrue(lambda n: n in flags))))]
        if len(body) not in (2, 3) or not m.matches(body[0], m.SimpleStatementLine(body=[m.Assign(
                targets=[m.AssignTarget(m.Tuple())], value=m.Call(func=m.Name("attention_interface")))])):
            return
        assign = body[0].body[0]  # type: ignore[attr-defined]
        if len(body) == 3:
            kind = self._packed_return(assign, body[1], body[2])
            if kind is None:
                return
            self._packs[fn.name.value] = kind
        if len(body) == 2 and (not m.matches(body[1], m.SimpleStatementLine(body=[m.Return(m.Tuple())])) or
                               code(body[1].body[0].value) != code(assign.targets[0].target)):  # type: ignore[attr-defined]
            return
        p = fn.params
        params = [x for x in (*p.posonly_params, *p.params)][1:]
        self._helpers[fn.name.value] = (params, assign.value)

    @staticmethod
    def _packed_return(assign: cst.Assign, packs: cst.BaseStatement, ret: cst.BaseStatement) -> str | None:
        """`outputs = [a]` then `return outputs` after `a, w = attention_interface(...)` (OpenAI GPT):
        "list" (or "tuple"), the pack its callers get back."""
        out = assign.targets[0].target.elements[0].value  # type: ignore[attr-defined]
        pack = packs.body[0] if m.matches(packs, m.SimpleStatementLine(body=[m.Assign(  # type: ignore[attr-defined]
            targets=[m.AssignTarget(m.Name())], value=m.List() | m.Tuple())])) else None
        if pack is None or len(pack.value.elements) != 1 or code(pack.value.elements[0].value) != code(out) \
                or not m.matches(ret, m.SimpleStatementLine(body=[m.Return(m.Name(pack.targets[0].target.value))])):
            return None
        return "list" if isinstance(pack.value, cst.List) else "tuple"

    def _dead_pure(self, st: cst.CSTNode, rest: list[cst.CSTNode]) -> bool:
        """Sizes nothing after reads any more (`query_length, key_length = q.size(-2), k.size(-2)`)."""
        small = st.body[0] if m.matches(st, m.SimpleStatementLine(body=[m.Assign()])) else None  # type: ignore[attr-defined]
        return small is not None and self._pure(small.value) and \
            not _writes(st) & set().union(set(), *(names_in(r) for r in rest))

    def leave_SimpleStatementLine(self, original, updated):
        return self._bind_packed(updated, self.current_function)

    def _bind_packed(self, updated: cst.SimpleStatementLine, caller: str | None) -> cst.SimpleStatementLine:
        """`attn_outputs = self._attn(...)` of a helper returning `[a]`: the call, and the list of its output
        on the same line (`a, _ = attention_interface(...); attn_outputs = [a]`)."""
        call = updated.body[0].value if m.matches(updated, m.SimpleStatementLine(body=[m.Assign(
            targets=[m.AssignTarget(m.Name())], value=m.Call())])) else None  # type: ignore[attr-defined]
        name = self_call_attr(call) if call is not None else None
        if name not in getattr(self, "_packs", {}) or caller == name:
            return updated
        new = self._bind_call(call, name)  # type: ignore[arg-type]
        if new is None:
            return updated
        used = names_in(self._helpers[name][1]) | names_in(updated)
        out = next(n for n in ("attn_output", "attn_output_", "attn_output__") if n not in used)
        pack = f"[{out}]" if self._packs[name] == "list" else f"({out},)"
        target = updated.body[0].targets[0].target.value  # type: ignore[attr-defined]
        return updated.with_changes(body=[cst.parse_statement(f"{out}, _ = 0\n").body[0].with_changes(value=new),
                                          cst.parse_statement(f"{target} = {pack}\n").body[0]])

    def leave_Call(self, original, updated):
        return self._bind_helper_call(updated, self.current_function)

    def _bind_helper_call(self, updated: cst.Call, caller: str | None) -> cst.Call:
        name = self_call_attr(updated)
        if name not in getattr(self, "_helpers", {}) or caller == name or name in self._packs:
            return updated
        new = self._bind_call(updated, name)
        return updated if new is None else new

    def _bind_late(self, cls: cst.ClassDef) -> cst.ClassDef:
        """The calls of a helper defined below its caller (GPT-NeoX-Japanese's `_attn` after `forward`):
        the walk met them before it knew the helper; they get its attention call now."""
        rule = self
        late = set(self._helpers) | set(self._packs)
        if not any(self_call_attr(c) in late for st in cls.body.body if isinstance(st, cst.FunctionDef)
                   and st.name.value not in late for c in findall(st, m.Call())):
            return cls

        class _Late(cst.CSTTransformer):
            def __init__(self, caller: str) -> None:
                super().__init__()
                self.caller = caller

            def leave_Call(self, original_node, updated_node):
                return rule._bind_helper_call(updated_node, self.caller)

            def leave_SimpleStatementLine(self, original_node, updated_node):
                return rule._bind_packed(updated_node, self.caller)

        body = [st.visit(_Late(st.name.value)) if isinstance(st, cst.FunctionDef) else st for st in cls.body.body]
        return cls.with_changes(body=cls.body.with_changes(body=body))

    def _bind_call(self, updated: cst.Call, name: str) -> cst.Call | None:
        """The helper's attention call with the caller's arguments bound to its parameters."""
        params, call = self._helpers[name]
        pos = [a.value for a in updated.args if a.keyword is None]
        kw = {a.keyword.value: a.value for a in updated.args if a.keyword is not None}
        bound: dict[str, cst.BaseExpression] = {}
        for i, prm in enumerate(params):
            value = pos[i] if i < len(pos) else kw.get(prm.name.value, prm.default)
            if value is None:
                return None
            bound[prm.name.value] = value

        class _Bind(cst.CSTTransformer):
            def leave_Name(self, original_node, updated_node):
                return bound.get(updated_node.value, updated_node)

        new_args = [a.with_changes(value=a.value.visit(_Bind())) if i > 0 else a for i, a in enumerate(call.args)]
        self._region_calls.add(name)  # the helper goes once nothing calls it
        return call.with_changes(args=new_args)

    def visit_FunctionDef(self, node):
        if len(self.scope) == 1:
            p = node.params
            self._params = [x.name.value for x in (*p.posonly_params, *p.params, *p.kwonly_params)]
        return super().visit_FunctionDef(node)

    # -- the region --------------------------------------------------------------------------
    def _pure(self, value: cst.BaseExpression) -> bool:
        """No sub-module call other than a dropout, no call of another object's method on self."""
        for c in findall(value, m.Call()):
            attr = self_call_attr(c)
            if attr is not None and attr not in self._dropouts and attr not in self._methods:
                return False
        return True

    def rewrite_block(self, body: list[cst.BaseStatement], params: list[str]) -> list[cst.BaseStatement] | None:
        i_s = next((i for i, st in enumerate(body) if _simple_assign(st) is not None
                    and findall(st, SOFTMAX)), None)
        if i_s is None:
            return None
        soft = _simple_assign(body[i_s])
        probs = _target(soft)  # type: ignore[arg-type]
        self._packed: tuple[cst.BaseExpression, str] | None = None
        self._conds: dict[int, str] = {}  # id(score step) -> the test it runs under
        found = self._forwards(body, i_s, probs)
        if found is None:
            return None
        derived, out_names, v_name, end = found
        region = {i_s} | {j for j in range(i_s + 1, end + 1) if _writes(body[j]) & (derived | set(out_names))}
        back = self._backwards(body, i_s, soft, v_name, region)  # type: ignore[arg-type]
        if back is None:
            return None
        score_steps, qk = back
        scale, alibi, alibi_scaled, mask, mask_scaled = self._scores(score_steps, params, _bound_once(body[:i_s]))
        if scale is False:
            return None
        window = self._causal_where(score_steps)
        if window is False:
            return None
        first = min(region)
        last = end - 1 if self._packed else end  # a packing statement stays: no reader of the region
        if not self._take_readers(body, region, first, last, set(qk) | {v_name} | derived | set(out_names)):
            return None
        args = f"self, {qk[0]}, {qk[1]}, {v_name}, {mask or 'None'}"
        args += f", scaling={scale or '1.0'}"  # no factor on the scores: the engine must not scale them either
        if window:
            args += f", sliding_window={window}"
        if mask_scaled:  # `(w + mask) * s`: a bias folded into the mask is scaled too (porter/plan/mask_bias.py)
            args += ", mask_scaled=True"
        if alibi is not None:
            args += f", alibi={alibi}"
            if alibi_scaled and scale is not None:
                args += f", alibi_scale={scale}"
        # the weights HF returns may be a reshape of the probabilities (XGLM's `attn_weights_reshaped`)
        after = set().union(set(), *(names_in(st) for st in body[end + 1:]))
        weights = [d for d in sorted(derived) if d in after]
        if len(weights) > 1:
            return None
        if not weights and (none := self._weights_none(body, i_s, end, after)) is not None:
            weights = [_target(_simple_assign(body[none]))]  # type: ignore[arg-type]
            region.add(none)
        call = cst.parse_statement(f"{out_names[-1]}, {weights[0] if weights else probs} = attention_interface({args})\n")
        if self._packed is not None:  # the list statement stays, holding the call's output
            region.discard(end)
            node, fresh = self._packed
            body = [*body[:end], body[end].deep_replace(node, cst.Name(fresh)), *body[end + 1:]]  # type: ignore[list-item]
        return self._replace_region(body, region, first, end, call)

    @staticmethod
    def _weights_none(body: list[cst.BaseStatement], i_s: int, end: int, after: set[str]) -> int | None:
        """`w_reshaped = None` between the softmax and the weighted sum, returned after it (OPT 4.x,
        once PT222 kept the arm where the weights are not asked for): the weights HF returns there;
        the call binds them instead (the engine returns none either way). Its index, or None."""
        for k in range(i_s + 1, end):
            small = _simple_assign(body[k])
            if small is None or not m.matches(small, m.Assign(value=m.Name("None"))):
                continue
            name = _target(small)
            others = [st for j, st in enumerate(body[i_s + 1:end + 1], i_s + 1) if j != k]
            if name in after and not any(name in names_in(st) for st in others):
                return k
        return None

    def _forwards(self, body: list[cst.BaseStatement], i_s: int, probs: str):
        """From the softmax forwards: the weighted sum and what only reshapes it. Returns (names
        derived from the probabilities, the output's names, v's name, index of the last output
        statement), or None."""
        derived, out_names, v_name, end = {probs}, [], None, None
        for j in range(i_s + 1, len(body)):
            small = _simple_assign(body[j])
            reads = _reads(small) if small is not None else names_in(body[j])
            if not reads & (derived | set(out_names)):
                if _writes(body[j]) & (derived | set(out_names)):
                    break
                continue
            if _raise_check(body[j]):
                continue  # a shape check: goes with the region (_take_readers)
            if small is None or not self._pure(small.value):
                break
            mm = _matmul(small.value)
            t = _target(small)
            if v_name is None and mm is not None and (_root(mm[0]) in derived) != (_root(mm[1]) in derived):
                v_name = _root(mm[1]) if _root(mm[0]) in derived else _root(mm[0])
                packed = self._packed_output(small.value, body)
                out_names.append(packed or t)
                end = j
                if packed:  # `outputs = [torch.matmul(w, v)]` (OpenAI GPT): the list keeps the call's output
                    break
            elif reads & set(out_names):
                out_names.append(t)
                end = j
            else:
                derived.add(t)
        if v_name is None or end is None:
            return None
        return derived, out_names, v_name, end

    def _packed_output(self, value: cst.BaseExpression, body: list[cst.BaseStatement]) -> str | None:
        """The weighted sum is an element of a list or tuple (`outputs = [torch.matmul(w, v)]`): a
        fresh name for the call's output, which the statement keeps in its place (`self._packed`)."""
        if not isinstance(value, (cst.List, cst.Tuple)):
            return None
        found = [e.value for e in value.elements if _matmul(e.value) is not None]
        if len(found) != 1 or not (m.matches(found[0], m.BinaryOperation(operator=m.MatrixMultiply()))
                                   or isinstance(found[0], cst.Call) and dotted(found[0].func) in _MATMUL_FUNCS):
            return None  # the element is the matmul itself, not an expression around one
        used = set().union(set(), *(names_in(st) for st in body))
        fresh = next(n for n in ("attn_output", "attn_output_", "attn_output__") if n not in used)
        self._packed = (found[0], fresh)
        return fresh

    def _backwards(self, body: list[cst.BaseStatement], i_s: int, soft, v_name: str, region: set[int]):
        """From the softmax backwards: the scores up to their matmul, then shape-only rebindings of
        q, k, v (added to `region`). Returns (the score steps, (q, k)), or None."""
        need = _tensor_roots(findall(soft.value, SOFTMAX)[0].args[0].value)  # type: ignore[union-attr,attr-defined]
        score_steps: list[cst.CSTNode] = [soft]  # type: ignore[list-item]
        qk: tuple[str, str] | None = None
        for k in range(i_s - 1, -1, -1):
            st = body[k]
            w = _writes(st)
            if qk is None:
                if not w & need:
                    continue
                small = _simple_assign(st)
                if small is None:  # `if attention_mask is not None: w = w + attention_mask`
                    if not isinstance(st, cst.If) or st.orelse is not None:
                        return None
                    stmts = [s for s in st.body.body if not _raise_check(s)]
                    rows = [s for s in stmts if _query_row_arm(s) is not None]
                    inner = [_simple_assign(s) for s in stmts if s not in rows]
                    if not all(self._adds_mask(inner, _query_row_arm(s), need) for s in rows):
                        return None  # a query-row slice of something the scores do not add as their mask
                    if not all(inner) or not all(self._pure(s.value) for s in inner):  # type: ignore[union-attr]
                        return None
                    region.add(k)
                    score_steps[:0] = inner  # type: ignore[misc]
                    if not any("mask" in n for n in names_in(st.test)):  # `if self.scale:` scales only when it holds
                        self._conds.update({id(s): code(st.test) for s in inner})
                    continue
                if not self._pure(small.value):
                    return None
                region.add(k)
                score_steps.insert(0, small)
                mm = _matmul(small.value)
                if mm is not None:
                    q, kk = _root(mm[0]), _root(mm[1])
                    if q is None or kk is None:
                        return None
                    qk = (q, kk)
                    need = {q, kk, v_name}
                else:
                    need = (need - w) | _tensor_roots(small.value)
                    if isinstance(small, cst.AugAssign):
                        need.add(_target(small))
                continue
            if not w & need:
                continue
            small = _simple_assign(st)
            if small is None or not self._pure(small.value) or _root(small.value) != _target(small) \
                    or _matmul(small.value) is not None:
                break  # where q/k/v come from: outside the region
            region.add(k)
        if qk is None:
            return None
        return score_steps, qk

    @staticmethod
    def _adds_mask(inner, name: str | None, scores: set[str]) -> bool:
        """`name` (not the scores) is what a later step adds to the scores (`w = w + mask`): an arm
        keeping its query rows only fits the mask to the queries of a cache step (`if q_len == 1:`);
        the engine masks each query itself, so the arm goes with the mask."""
        if name is None or name in scores:
            return False
        return any(s is not None and m.matches(s.value, m.BinaryOperation(operator=m.Add(), right=m.Name(name)))
                   and _root(s.value.left) in scores for s in inner)  # type: ignore[attr-defined]

    @staticmethod
    def _take_readers(body: list[cst.BaseStatement], region: set[int], first: int, end: int,
                      tensors: set[str]) -> bool:
        """The statements between the region's first and last that read what it computes go with it
        (added to `region`); False when one rebinds its tensors or is read outside."""
        inner = set().union(*(_writes(body[k]) for k in region))
        region |= {k for k in range(first, end + 1) if _raise_check(body[k]) and names_in(body[k]) & inner}
        for k in range(first, end + 1):
            if k in region:
                continue
            if _writes(body[k]) & tensors:
                return False
            if names_in(body[k]) & inner:  # `input_dtype = scores.dtype`: goes with the region if nothing else reads it
                # (read later outside the region: statements before it read an earlier binding)
                outside = set().union(*(names_in(st) for j, st in enumerate(body) if j not in region and j > k))
                if not m.matches(body[k], m.SimpleStatementLine(body=[m.Assign()])) or _writes(body[k]) & outside:
                    return False
                region.add(k)
        return True

    def _replace_region(self, body: list[cst.BaseStatement], region: set[int], first: int, end: int,
                        call: cst.BaseStatement) -> list[cst.BaseStatement]:
        """The block with the region's statements replaced by the one attention call."""
        # blank lines keep every later line where it was in the source (errors name source lines;
        # the port is formatted afterwards)
        if self.keep_lines:
            spanned = sum(nlines(body[k]) for k in region)
            call = call.with_changes(leading_lines=[cst.EmptyLine()] * max(0, spanned - 1))
        else:
            call = call.with_changes(leading_lines=body[first].leading_lines)
        out: list[cst.BaseStatement] = []
        for k, st in enumerate(body):
            if k == end:
                out.append(call)
            if k not in region:
                out.append(st)
            if k in region:
                self._region_calls |= {a for c in findall(st, m.Call()) if (a := self_call_attr(c)) in self._methods}
        return out

    def leave_ClassDef(self, original, updated):
        """Helper methods only the region called (`_merge_heads`) go with it."""
        if len(self.scope) == 1:
            updated = self._bind_late(updated)
        if len(self.scope) == 1 and self._region_calls:
            still = {self_call_attr(c) for c in findall(updated, m.Call())}
            gone = self._region_calls - still
            body: list[cst.BaseStatement] = []
            pad = 0
            for st in updated.body.body:
                if isinstance(st, cst.FunctionDef) and st.name.value in gone:
                    pad += nlines(st)
                    self.mark(f"{updated.name.value}.{st.name.value}")
                    continue
                if pad and self.keep_lines:
                    st = st.with_changes(leading_lines=[*([cst.EmptyLine()] * pad), *st.leading_lines])
                    pad = 0
                body.append(st)
            if not self.keep_lines and body and body[0] is not updated.body.body[0] and isinstance(body[0], cst.FunctionDef):
                body[0] = body[0].with_changes(leading_lines=())
            footer = list(updated.body.footer)
            if pad and self.keep_lines:  # the last method: the class's trailing blank lines hold its lines
                footer = [*([cst.EmptyLine(indent=False)] * pad), *footer]
            updated = updated.with_changes(body=updated.body.with_changes(body=body, footer=footer))
            self._region_calls = set()
        return super().leave_ClassDef(original, updated)

    def _causal_where(self, steps) -> str | None | bool:
        """`w = torch.where(causal_mask, w, min)` among the score steps, where `causal_mask` slices a
        causal buffer of the class (porter/analysis/causal_buffer.py): the sliding window of a banded
        buffer, None for the plain triangle (the engine is causal) or no such step, False when a
        `where` masks the scores with something else."""
        bound = {_target(st): st.value for st in steps if isinstance(st, cst.Assign)}
        window: str | None = None
        slices = {t for t, v in bound.items() if buffer_of(v)}
        for st in steps:
            if (blend := _blend(st.value)) is not None:  # `w * b + -1e4 * (1 - b)` (OpenAI GPT)
                b, fill = blend
                buf = self._buffers.get(buffer_of(bound.get(b.value, b) if isinstance(b, cst.Name) else b) or "")
                if buf is None or not mask_fill(fill):
                    return False
                window = buf.window
                continue
            if names_in(st.value) & slices and not findall(st.value, m.Call(func=m.Attribute(attr=m.Name("where")))):
                return False  # a buffer slice read some other way: what it lets through is unknown
            for c in findall(st.value, m.Call(func=m.Attribute(value=m.Name("torch"), attr=m.Name("where")))):
                args = [a.value for a in c.args]  # type: ignore[attr-defined]
                if len(args) != 3:
                    return False
                cond, fill = args[0], args[2]
                cond = bound.get(cond.value, cond) if isinstance(cond, cst.Name) else cond
                buf = self._buffers.get(buffer_of(cond) or "")
                fills = [fill, *(v for t, v in bound.items() if isinstance(fill, cst.Name) and t == fill.value)]
                fills += [st2.value for st2 in steps if isinstance(fill, cst.Name) and isinstance(st2, cst.Assign)
                          and _target(st2) == fill.value]
                if buf is None or not any(mask_fill(f) for f in fills):
                    return False
                window = buf.window
        return window

    def _scores(self, steps, params: list[str], bound: dict[str, cst.BaseExpression | None]):
        """(scale, alibi, alibi scaled, mask) from the statements between the score matmul and the
        softmax; scale False when a step is not a scale, mask or bias."""
        scale: str | None = None
        alibi: str | None = None
        alibi_scaled = False

        def addend(e: cst.BaseExpression) -> None:
            nonlocal alibi
            root = _root(e)
            if root is None or root not in params:
                return
            if "mask" in root:
                found_mask.add(root)
            elif alibi is None:
                alibi = root

        found_mask: set[str] = set()
        mask_scaled = False
        for small in steps:
            value = small.value
            for c in findall(value, SOFTMAX):
                value = c.args[0].value  # type: ignore[attr-defined]
            if _floor_at_min(value):
                continue  # `torch.max(w, finfo.min)` after the mask: nothing the engine computes changes (why)
            mm = _matmul(value)
            if mm is not None and mm[2] is not None:  # bias.baddbmm(batch1=q, batch2=k, beta=, alpha=)
                kw = {a.keyword.value: a.value for a in mm[2].args if a.keyword is not None}
                if "alpha" in kw:
                    scale = _mul(scale, code(kw["alpha"]))
                if not adds_nothing(mm[2], bound):  # beta * zeros: only the scaled product is left
                    base = baddbmm_input(mm[2])
                    if base is None or _root(base) not in params:
                        return False, None, False, None, False  # it adds something that is neither zeros nor a bias input
                    addend(base)
            if isinstance(small, cst.AugAssign):
                op, rhs = small.operator, small.value
            elif isinstance(value, cst.BinaryOperation):
                op, rhs = value.operator, value.right
            else:
                continue
            cond = self._conds.get(id(small))
            if found_mask and isinstance(op, (cst.Divide, cst.DivideAssign, cst.Multiply, cst.MultiplyAssign)):
                mask_scaled = True
            if cond is not None and isinstance(op, (cst.Divide, cst.DivideAssign, cst.Multiply, cst.MultiplyAssign)):
                factor = f"1 / {code(rhs)}" if isinstance(op, (cst.Divide, cst.DivideAssign)) else code(rhs)
                scale = _mul(scale, f"({factor} if {cond} else 1.0)")
            elif isinstance(op, (cst.Divide, cst.DivideAssign)):
                scale = _mul(scale, f"1 / {code(rhs)}") if scale is None else f"{scale} / {code(rhs)}"
            elif isinstance(op, (cst.Multiply, cst.MultiplyAssign)):
                if alibi is not None:
                    alibi_scaled = True
                scale = _mul(scale, code(rhs))
            elif isinstance(op, (cst.Add, cst.AddAssign)):
                addend(rhs)
        mask = next(iter(sorted(found_mask)), None)
        return scale, alibi, alibi_scaled, mask, mask_scaled
