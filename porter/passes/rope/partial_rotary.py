"""PT019 partial-rotary: the rule `PartialRotary`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.passes.base import Example, Rule


class PartialRotary(Rule):
    descend_methods = frozenset()
    code = "PT019"
    name = "partial-rotary"
    why = (
        "Models with partial rotary (`partial_rotary_factor` < 1) split each head into a rotated "
        "and a passed-through part, rotate the first and concatenate them back. The engine's "
        "`get_rope` does that split itself from `rope_parameters`, on whole flat q/k: the split, "
        "the concatenation and the renames disappear and the rotary call takes q and k whole."
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
        )
    ]

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        if not self.kept(cls) or len(self.scope) != 1 or updated.name.value != "forward":
            return updated
        parts: dict[str, str] = {}  # rot/pass name -> the whole tensor's name
        body = []
        for st in updated.body.body:
            split = self._split(st)
            if split:
                parts.update(split)
                continue
            body.append(st)
        if not parts:
            return updated
        out = []
        for st in body:
            if self._rejoin(st, parts):
                continue
            out.append(st)
        rename = {k: v for k, v in parts.items()}

        class _Rename(cst.CSTTransformer):
            def leave_Name(self, o, u):
                return u.with_changes(value=rename[u.value]) if u.value in rename else u

        out = [st.visit(_Rename()) for st in out]
        self.mark(f"{cls}.forward")
        return updated.with_changes(body=updated.body.with_changes(body=out))

    @staticmethod
    def _split(st) -> dict[str, str] | None:
        pattern = m.SimpleStatementLine(body=[m.Assign(
            targets=[m.AssignTarget(m.Tuple(elements=[m.Element(m.Name()), m.Element(m.Name())]))],
            value=m.Tuple(elements=[m.Element(m.Subscript(value=m.Name())), m.Element(m.Subscript(value=m.Name()))]),
        )])
        if not m.matches(st, pattern):
            return None
        assign = st.body[0]
        rot, keep = (e.value.value for e in assign.targets[0].target.elements)
        a, b = (e.value for e in assign.value.elements)
        if a.value.value != b.value.value:
            return None
        sa, sb = a.slice[-1].slice, b.slice[-1].slice
        if not (isinstance(sa, cst.Slice) and isinstance(sb, cst.Slice) and sa.lower is None and sb.upper is None):
            return None
        return {rot: a.value.value, keep: a.value.value}

    @staticmethod
    def _rejoin(st, parts: dict[str, str]) -> bool:
        pattern = m.SimpleStatementLine(body=[m.Assign(
            targets=[m.AssignTarget(m.Name())],
            value=m.Call(func=m.Attribute(value=m.Name("torch"), attr=m.Name("cat")),
                         args=[m.Arg(m.Tuple()), m.ZeroOrMore()]))])
        if not m.matches(st, pattern):
            return False
        assign = st.body[0]
        names = [e.value.value for e in assign.value.args[0].value.elements if isinstance(e.value, cst.Name)]
        target = assign.targets[0].target.value
        return len(names) == 2 and all(parts.get(n) == target for n in names)
