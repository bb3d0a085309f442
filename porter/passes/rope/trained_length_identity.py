"""PT300 trained-length-identity: the rule `TrainedLengthIdentity`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, dotted, find_method, findall, names_in, transform
from porter.analysis.scalar_eval import Unknown, run_assigns, value_of
from porter.passes.attention._common import nlines
from porter.passes.base import Example, Rule, SourceContext

# trained lengths the identity is checked at: every length from 1 up to each of them
SAMPLE_LENGTHS = (1, 2, 3, 5, 8, 31, 96, 100, 512, 2048)


def _assign(st: cst.CSTNode) -> tuple[str, cst.BaseExpression] | None:
    """`x = e` / `self.x = e` (one target): (dotted target, e)."""
    if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget()])])):
        a = st.body[0]  # type: ignore[attr-defined]
        t = dotted(a.targets[0].target)
        return (t, a.value) if t else None
    return None


def _init_attrs(init: cst.FunctionDef) -> dict[str, cst.BaseExpression]:
    """`self.X = V` of __init__ (first binding, top level): {"self.X": V}; locals as well."""
    out: dict[str, cst.BaseExpression] = {}
    for st in init.body.body:
        if (a := _assign(st)) is not None:
            out.setdefault(a[0], a[1])
    return out


def _config_lengths(attrs: dict[str, cst.BaseExpression]) -> dict[str, str]:
    """self attributes holding a config field as it is: {"self.seq_length": "config.seq_length"}."""
    return {k: code(v) for k, v in attrs.items() if k.startswith("self.")
            and m.matches(v, m.Attribute(value=m.Name("config"), attr=m.Name()))}


def _one(v) -> bool:
    return not isinstance(v, bool) and v == 1


class TrainedLengthIdentity(Rule):
    code = "PT300"
    name = "trained-length-identity"
    why = (
        "Qwen-1 stretches its context past the length it was trained at (`config.seq_length`) two ways: "
        "dynamic NTK, a rotary base raised by a factor computed from the sequence length "
        "(`ntk_alpha = max(2 ** ceil(log2(L / S) + 1) - 1, 1)`, cached for the decode steps), and logn "
        "attention, the query multiplied per position by a table built in __init__ "
        "(`log(i, S) if i > S else 1`). Both are the identity while every position is within the trained "
        "length: the factor is 1 and the table's entries are 1. That is shown, not assumed: the arm computing "
        "the factor and the table's element are read by a small interpreter (porter/analysis/scalar_eval.py) "
        "at every length 1..S for trained lengths S up to 2048, and must give exactly 1 (the cached factor's "
        "initial value too). The arm then goes and the factor is the literal 1; the block scaling the query "
        "goes. What they compute beyond the trained length is not approximated: PT297 makes the port refuse, "
        "at load, a max_model_len greater than that config field."
    )
    _src = (
        "import math\n\nfrom torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
        "        super().__init__()\n        self.seq_length = config.seq_length\n        self._ntk_cached = 1.0\n"
        "        logn_list = [math.log(i, self.seq_length) if i > self.seq_length else 1 for i in range(1, 32768)]\n"
        "        self.logn_tensor = torch.Tensor(logn_list)[None, :, None, None]\n\n"
        "    def forward(self, x, layer_past=None):\n        q, k, v = self.c_attn(x).split(64, dim=2)\n"
        "        kv_seq_len = x.size()[1]\n{ntk}"
        "        emb = self.rotary_emb(kv_seq_len, ntk_alpha={alpha})\n{logn}"
        "        out, _ = attention_interface(self, q, k, v, None)\n        return out\n"
    )
    _ntk = (
        "        if self.use_dynamic_ntk and kv_seq_len == x.size()[1] and not self.training:\n"
        "            context_value = math.log(kv_seq_len / self.seq_length, 2) + 1\n"
        "            ntk_alpha = 2 ** math.ceil(context_value) - 1\n"
        "            ntk_alpha = max(ntk_alpha, 1)\n            self._ntk_cached = ntk_alpha\n"
        "        else:\n            ntk_alpha = self._ntk_cached\n"
    )
    _logn = (
        "        if self.use_logn_attn and not self.training:\n"
        "            if self.logn_tensor.device != q.device:\n"
        "                self.logn_tensor = self.logn_tensor.to(q.device).type_as(q)\n"
        "            seq_start = k.size(1) - q.size(1)\n            seq_end = k.size(1)\n"
        "            logn_tensor = self.logn_tensor[:, seq_start:seq_end, :, :]\n"
        "            q = q * logn_tensor.expand_as(q)\n"
    )
    examples = [
        Example(_src.format(ntk=_ntk, alpha="ntk_alpha", logn=_logn), _src.format(ntk="", alpha="1", logn="")),
        # unchanged: a factor that is not 1 within the trained length (here 2 at every length)
        Example(_src.format(ntk=_ntk.replace("max(ntk_alpha, 1)", "max(ntk_alpha, 2)"), alpha="ntk_alpha", logn=""),
                _src.format(ntk=_ntk.replace("max(ntk_alpha, 1)", "max(ntk_alpha, 2)"), alpha="ntk_alpha", logn="")),
    ]

    @classmethod
    def applies(cls, ctx) -> bool:
        return True

    def rewrite(self, module: cst.Module) -> cst.Module:
        if not isinstance(self.ctx, SourceContext):
            return super().rewrite(module)
        self.keep_lines = True
        return transform(module, self)

    def visit_ClassDef(self, node):
        if not self.scope:
            self._init = find_method(node, "__init__")
        return super().visit_ClassDef(node)

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        init = getattr(self, "_init", None)
        if len(self.scope) != 1 or updated.name.value != "forward" or init is None:
            return updated
        attrs = _init_attrs(init)
        lengths = _config_lengths(attrs)
        body, ones, found, gone = [], set(), [], 0
        for st in updated.body.body:
            if isinstance(st, cst.If) and (name := self._factor_arm(st, attrs, lengths)) is not None:
                ones.add(name[0])
                found.append((name[1], "dynamic NTK rotary base", _one_line(st.test)))
                gone += nlines(st)
                continue
            if isinstance(st, cst.If) and (field := self._table_scale(st, attrs, lengths)) is not None:
                found.append((field, "logn attention scale of the query", _one_line(st.test)))
                gone += nlines(st)
                continue
            if gone and getattr(self, "keep_lines", False):  # before indexing: later lines keep their numbers
                st = st.with_changes(leading_lines=[*([cst.EmptyLine()] * gone), *st.leading_lines])
            gone = 0
            body.append(st)
        if not found:
            return updated

        class _One(cst.CSTTransformer):
            def leave_Name(self, original_node, updated_node):
                return cst.Integer("1") if updated_node.value in ones else updated_node

            def leave_Attribute(self, original_node, updated_node):
                return updated_node.with_changes(attr=original_node.attr)  # `config.ntk_alpha`: an attribute name is no local

            def leave_Arg(self, original_node, updated_node):
                return updated_node.with_changes(keyword=original_node.keyword)  # `ntk_alpha=`: a keyword is no local

        body = [st.visit(_One()) for st in body]
        for field, what, test in found:
            self.ctx.trained_length.setdefault(field, []).append(f"{what} ({cls}.forward: if {test})")
        self.mark(f"{cls}.forward")
        return updated.with_changes(body=updated.body.with_changes(body=body))

    # -- the factor: `if ...: <computes X from a length and S> else: X = self.cached` -------------
    def _factor_arm(self, st: cst.If, attrs, lengths) -> tuple[str, str] | None:
        """(X, the config field S is) when both arms bind X, the first computes it from lengths and one
        trained length S, the second reads a cache only the first writes, and X is 1 at every length
        1..S (its cache starting at 1)."""
        if not isinstance(st.orelse, cst.Else) or len(st.orelse.body.body) != 1:
            return None
        other = _assign(st.orelse.body.body[0])
        arm = list(st.body.body)
        if other is None or not other[0].isidentifier() or not other[1] or not all(_assign(s) for s in arm):
            return None
        name, cache = other[0], dotted(other[1])
        if cache is None or not cache.startswith("self.") or cache not in attrs:
            return None
        try:
            if not _one(value_of(attrs[cache], {})):
                return None
        except Unknown:
            return None
        writes = [_assign(s)[0] for s in arm]  # type: ignore[index]
        if name not in writes or any(w.startswith("self.") and w != cache for w in writes):
            return None
        reads = set().union(*(names_in(_assign(s)[1]) for s in arm)) - set(writes) - {"math", "max", "min", "abs",  # type: ignore[index]
                                                                                      "int", "float", "self"}
        selfs = {dotted(a) for s in arm for a in findall(_assign(s)[1], m.Attribute(value=m.Name("self")))}  # type: ignore[index]
        if len(selfs) != 1 or (trained := next(iter(selfs))) not in lengths:
            return None
        for s_len in SAMPLE_LENGTHS:
            for length in range(1, s_len + 1):
                try:
                    env = run_assigns(arm, {**{r: length for r in reads}, trained: s_len})  # type: ignore[dict-item]
                except Unknown:
                    return None
                if not _one(env.get(name)):
                    return None
        return name, lengths[trained]

    # -- the table: `if ...: q = q * self.table[:, a:b, ...]` with the table's first S entries 1 --
    def _table_scale(self, st: cst.If, attrs, lengths) -> str | None:
        """The config field S is when the arm only scales a tensor by a slice of a table of __init__ whose
        entries at 1..S are 1 (moving the table to the tensor's device and dtype on the way)."""
        if st.orelse is not None:
            return None
        stmts = list(st.body.body)
        last = _assign(stmts[-1]) if stmts else None
        if last is None or not m.matches(last[1], m.BinaryOperation(operator=m.Multiply(), left=m.Name(last[0]))):
            return None
        factor = last[1].right  # type: ignore[attr-defined]
        local = {a[0]: a[1] for s in stmts[:-1] if (a := _assign(s)) is not None}
        root = _unwrap(factor)  # `t.expand_as(q)`
        if isinstance(root, cst.Name):
            root = _unwrap(local.get(root.value, root))  # `t = self.table[:, a:b].type_as(q)`
        table = dotted(root.value) if isinstance(root, cst.Subscript) else None
        if table is None or table not in attrs:
            return None
        for s in stmts[:-1]:  # locals, or the move of the table: `if ...: self.t = self.t.to(d).type_as(q)`
            if _assign(s) is not None and not _assign(s)[0].startswith("self."):  # type: ignore[index]
                continue
            moves = [a for x in (s.body.body if isinstance(s, cst.If) and s.orelse is None else [])
                     if (a := _assign(x)) is not None]
            if not moves or any(t != table or _root_of(v) != table for t, v in moves) or len(moves) != len(s.body.body):  # type: ignore[union-attr]
                return None
        return self._ones_up_to(attrs[table], attrs, lengths)

    @staticmethod
    def _ones_up_to(built: cst.BaseExpression, attrs, lengths) -> str | None:
        """`torch.Tensor(L)[None, :, None, None]` (or `torch.tensor(L)`), L a list comprehension over
        `range(a, b)` of __init__ whose entries at a..a+S-1 are 1 for every trained length S."""
        while isinstance(built, cst.Subscript):
            built = built.value
        if not m.matches(built, m.Call(func=m.Attribute(value=m.Name("torch"), attr=m.Name("Tensor") | m.Name("tensor")),
                                       args=[m.Arg(m.Name())])):
            return None
        comp = attrs.get(built.args[0].value.value)  # type: ignore[attr-defined]
        if not isinstance(comp, cst.ListComp) or comp.for_in.inner_for_in is not None or comp.for_in.ifs \
                or not isinstance(comp.for_in.target, cst.Name) \
                or not m.matches(comp.for_in.iter, m.Call(func=m.Name("range"), args=[m.Arg(), m.Arg()])):
            return None
        var = comp.for_in.target.value
        selfs = {dotted(a) for a in findall(comp.elt, m.Attribute(value=m.Name("self")))}
        if len(selfs) != 1 or (trained := next(iter(selfs))) not in lengths:
            return None
        try:
            start = value_of(comp.for_in.iter.args[0].value, {})  # type: ignore[attr-defined]
            for s_len in SAMPLE_LENGTHS:
                for i in range(int(start), int(start) + s_len):
                    if not _one(value_of(comp.elt, {var: i, trained: s_len})):
                        return None
        except Unknown:
            return None
        return lengths[trained]


def _unwrap(e: cst.BaseExpression) -> cst.BaseExpression:
    """`x.expand_as(q).type_as(q)` -> `x`: what a chain of tensor methods starts from."""
    while isinstance(e, cst.Call) and isinstance(e.func, cst.Attribute):
        e = e.func.value
    return e


def _one_line(e: cst.BaseExpression) -> str:
    text = " ".join(code(e).split())
    return text[1:-1].strip() if text.startswith("(") and text.endswith(")") else text


def _root_of(e: cst.BaseExpression) -> str | None:
    while isinstance(e, cst.Call) and isinstance(e.func, cst.Attribute):
        e = e.func.value
    return dotted(e)
