"""PT019 partial-rotary: the rule `PartialRotary`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, names_in
from porter.analysis.layouts import last_axis_part as _part
from porter.passes.base import Example, Rule

_CAT = m.Call(func=m.Attribute(value=m.Name("torch"), attr=m.Name("cat")), args=[m.Arg(m.Tuple()), m.ZeroOrMore()])


def _cat_last(value: cst.BaseExpression) -> list[cst.BaseExpression] | None:
    """`torch.cat((a, b), dim=-1)` (maybe `.contiguous()`): [a, b]."""
    if m.matches(value, m.Call(func=m.Attribute(attr=m.Name("contiguous")), args=[])):
        value = value.func.value  # type: ignore[attr-defined]
    if not m.matches(value, _CAT):
        return None
    dim = [a.value for a in value.args[1:] if a.keyword is None or a.keyword.value == "dim"]  # type: ignore[attr-defined]
    if len(dim) != 1 or code(dim[0]) != "-1":
        return None
    return [e.value for e in value.args[0].value.elements]  # type: ignore[attr-defined]


class PartialRotary(Rule):
    descend_methods = frozenset()
    code = "PT019"
    name = "partial-rotary"
    why = (
        "Models with partial rotary (`partial_rotary_factor` < 1) split each head into a rotated "
        "and a passed-through part, rotate the first and concatenate them back. The engine's "
        "`get_rope` does that split itself from `rope_parameters`, on whole flat q/k: the split, "
        "the concatenation and the renames disappear and the rotary call takes q and k whole. "
        "Found by dataflow: slices of the last axis at one width n (`[..., :n]`, `[..., n:]`, in one "
        "statement or one each: GPT-NeoX-Japanese), a call that takes the first parts, and a "
        "`torch.cat` on the last axis of what it returns for a part and that part's rest. The width n "
        "is the rotary table's (cos/sin multiply the first part elementwise), which HF's rotary module "
        "and the engine's `get_rope` both compute as `int(head_dim * partial_rotary_factor)`."
    )
    examples = [
        Example(
            "class A(nn.Module):\n    def forward(self, x, cos, sin):\n        q = self.q(x)\n        k = self.k(x)\n"
            "        q_rot, q_pass = (q[..., : self.n], q[..., self.n :])\n"
            "        k_rot, k_pass = (k[..., : self.n], k[..., self.n :])\n"
            "        q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot, cos, sin)\n"
            "        q = torch.cat((q_rot, q_pass), dim=-1)\n        k = torch.cat((k_rot, k_pass), dim=-1)\n"
            "        return q, k\n",
            "class A(nn.Module):\n    def forward(self, x, cos, sin):\n        q = self.q(x)\n        k = self.k(x)\n"
            "        q, k = apply_rotary_pos_emb(q, k, cos, sin)\n        return q, k\n",
        ),
        Example(  # one statement per part, the rotated parts rebinding the whole names (GPT-NeoX-Japanese)
            "class A(nn.Module):\n    def forward(self, x, cos, sin):\n        q = self.q(x)\n        k = self.k(x)\n"
            "        q_rot = q[..., : self.n]\n        q_pass = q[..., self.n :]\n"
            "        k_rot = k[..., : self.n]\n        k_pass = k[..., self.n :]\n"
            "        q, k = apply_rotary_pos_emb(q_rot, k_rot, cos, sin)\n"
            "        q = torch.cat((q, q_pass), dim=-1).contiguous()\n        k = torch.cat((k, k_pass), dim=-1).contiguous()\n"
            "        return q, k\n",
            "class A(nn.Module):\n    def forward(self, x, cos, sin):\n        q = self.q(x)\n        k = self.k(x)\n"
            "        q, k = apply_rotary_pos_emb(q, k, cos, sin)\n        return q, k\n",
        ),
    ]

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        if not self.kept(cls) or len(self.scope) != 1 or updated.name.value != "forward":
            return updated
        new = self._fold(list(updated.body.body))
        if new is None:
            return updated
        self.mark(f"{cls}.forward")
        return updated.with_changes(body=updated.body.with_changes(body=new))

    def _fold(self, body: list[cst.BaseStatement]) -> list[cst.BaseStatement] | None:
        parts: dict[str, tuple[str, str, str]] = {}  # part name -> (whole tensor, "rot" | "pass", width)
        split_at: set[int] = set()
        for i, st in enumerate(body):
            found = self._split(st)
            if found:
                parts.update(found)
                split_at.add(i)
        rot = {n: t for n, (t, kind, _) in parts.items() if kind == "rot"}
        rest = {n: t for n, (t, kind, _) in parts.items() if kind == "pass"}
        width = {t: w for (t, kind, w) in parts.values()}
        if not rot or any(len({w for (t2, _, w) in parts.values() if t2 == t}) != 1 for t in width) \
                or set(rot.values()) != set(rest.values()):
            return None  # each tensor split once, at one width, into both parts
        # the call taking the rotated parts: what it returns for each
        after = max(split_at)
        call_at = next((i for i, st in enumerate(body) if i > after and names_in(st) & set(rot)), None)
        if call_at is None:
            return None
        rotated = self._rotated(body[call_at], rot)
        if rotated is None:
            return None
        joins: dict[int, tuple[str, str]] = {}  # statement -> (target, whole tensor)
        for i in range(call_at + 1, len(body)):
            small = body[i].body[0] if m.matches(body[i], m.SimpleStatementLine(body=[m.Assign(
                targets=[m.AssignTarget(m.Name())])])) else None  # type: ignore[attr-defined]
            cat = _cat_last(small.value) if small is not None else None
            if cat is None or len(cat) != 2 or not all(isinstance(e, cst.Name) for e in cat):
                continue
            a, b = (e.value for e in cat)  # type: ignore[attr-defined]
            if b in rest and rotated.get(a) == rest[b]:
                joins[i] = (small.targets[0].target.value, rest[b])  # type: ignore[union-attr]
        if {t for _, t in joins.values()} != set(rot.values()):
            return None
        # the parts and the call's outputs are read nowhere else
        local = set(parts) | {a for a, t in rotated.items() if a != t}
        if any(names_in(st) & local for i, st in enumerate(body)
               if i not in split_at and i != call_at and i not in joins and i > min(split_at)):
            return None
        rename = {**{n: t for n, t in rot.items()}, **{n: t for n, t in rotated.items()}}

        class _Rename(cst.CSTTransformer):
            def leave_Name(self, o, u):
                return u.with_changes(value=rename[u.value]) if u.value in rename else u

        out: list[cst.BaseStatement] = []
        for i, st in enumerate(body):
            if i in split_at:
                continue
            if i == call_at:
                st = st.visit(_Rename())
            if i in joins:
                target, whole = joins[i]
                if target == whole:
                    continue
                st = cst.parse_statement(f"{target} = {whole}\n").with_changes(leading_lines=st.leading_lines)
            out.append(st)
        return out

    @staticmethod
    def _rotated(st: cst.BaseStatement, rot: dict[str, str]) -> dict[str, str] | None:
        """`a, b = f(q_rot, k_rot, ...)`: {a: q, b: k} (the whole tensor of the part each returns)."""
        if not m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Tuple())], value=m.Call())])):
            return None
        assign = st.body[0]  # type: ignore[attr-defined]
        outs = [e.value for e in assign.targets[0].target.elements]
        args = [a.value for a in assign.value.args if a.keyword is None]
        wholes = [rot.get(a.value) if isinstance(a, cst.Name) else None for a in args[:len(outs)]]
        if len(outs) > len(args) or not all(isinstance(o, cst.Name) for o in outs) or not all(wholes):
            return None
        return {o.value: w for o, w in zip(outs, wholes)}  # type: ignore[misc]

    @staticmethod
    def _split(st) -> dict[str, tuple[str, str, str]] | None:
        """`q_rot, q_pass = (q[..., :n], q[..., n:])` or `q_rot = q[..., :n]`: part name -> its part."""
        if not m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget()])])):
            return None
        assign = st.body[0]
        target, value = assign.targets[0].target, assign.value
        if isinstance(target, cst.Name):
            pairs = [(target, value)]
        elif isinstance(target, cst.Tuple) and isinstance(value, cst.Tuple) and len(target.elements) == len(value.elements):
            pairs = [(t.value, v.value) for t, v in zip(target.elements, value.elements)]
        else:
            return None
        out = {}
        for t, v in pairs:
            part = _part(v)
            if not isinstance(t, cst.Name) or part is None or t.value == part[0]:
                return None
            out[t.value] = part
        return out
