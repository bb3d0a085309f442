"""PT101 flat-tokens: the rule `FlatTokens`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, findall
from porter.passes.base import Example, Rule


class FlatTokens(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT101"
    name = "flat-tokens"
    why = (
        "HF unpacks `batch, seq, hidden = x.shape` to flatten tokens and restores the batch "
        "afterwards with `y.reshape(batch, seq, hidden)`. The engine's hidden states are already "
        "flat (`[num_tokens, hidden]`), where the three-way unpack fails: only the last dimension "
        "is kept (`hidden = x.shape[-1]`) and the restoring reshape is dropped; so is a restore to "
        "`(-1, seq_length, hidden)` with `seq_length = x.shape[1]` (on flat tokens, the hidden size)."
    )
    examples = [
        Example(
            "class A(nn.Module):\n    def forward(self, x):\n"
            "        batch_size, sequence_length, hidden_dim = x.shape\n"
            "        y = self.f(x.view(-1, hidden_dim))\n"
            "        return y.reshape(batch_size, sequence_length, hidden_dim)\n",
            "class A(nn.Module):\n    def forward(self, x):\n"
            "        hidden_dim = x.shape[-1]\n"
            "        y = self.f(x.view(-1, hidden_dim))\n"
            "        return y\n",
        ),
    ]

    def visit_FunctionDef(self, node):
        self._batch: set[str] = set()
        restores = [c for c in findall(node, m.Call(func=m.Attribute(attr=m.Name("reshape") | m.Name("view"))))
                    if len(c.args) == 3]  # type: ignore[attr-defined]
        for st in findall(node, m.Assign(targets=[m.AssignTarget(m.Tuple())])):
            names = st.targets[0].target.elements  # type: ignore[attr-defined]
            value = st.value  # type: ignore[attr-defined]
            shape = m.Attribute(attr=m.Name("shape")) | m.Call(func=m.Attribute(attr=m.Name("size")), args=[])
            if len(names) == 3 and m.matches(value, shape) and all(isinstance(e.value, cst.Name) for e in names):
                batch = [e.value.value for e in names[:2]]
                if any([code(a.value) for a in c.args[:2]] == batch for c in restores):  # type: ignore[attr-defined]
                    self._batch |= set(batch)
        # `seq_length = x.shape[1]; output_shape = (-1, seq_length, h); y = y.view(output_shape)` (GPT-J)
        dim1 = m.Subscript(value=m.Attribute(attr=m.Name("shape")), slice=[m.SubscriptElement(m.Index(m.Integer("1")))]) \
            | m.Call(func=m.Attribute(attr=m.Name("size")), args=[m.Arg(m.Integer("1"))])
        seq = {st.targets[0].target.value for st in findall(node, m.Assign(  # type: ignore[attr-defined]
            targets=[m.AssignTarget(m.Name())], value=dim1))}
        self._seq_shapes = {st.targets[0].target.value for st in findall(node, m.Assign(  # type: ignore[attr-defined]
            targets=[m.AssignTarget(m.Name())], value=m.Tuple(elements=[m.Element(), m.Element(
                m.Name(m.MatchIfTrue(lambda n: n in seq))), m.Element()])))}
        # nothing to flatten in this method: its body need not be walked
        return super().visit_FunctionDef(node) and bool(self._batch or self._seq_shapes)

    def leave_Assign(self, original, updated):
        if not self.kept(self.current_class) or self.current_function != "forward":
            return updated
        t = updated.targets[0].target
        if isinstance(t, cst.Tuple) and len(t.elements) == 3 and all(
                isinstance(e.value, cst.Name) for e in t.elements) and {e.value.value for e in t.elements[:2]} <= self._batch:
            value = updated.value
            last = cst.parse_expression("x[-1]" if isinstance(value, cst.Attribute) else "x(-1)")
            if isinstance(value, cst.Attribute):
                new = last.with_changes(value=value)
            else:
                new = value.with_changes(args=last.args)  # type: ignore[attr-defined]
            return updated.with_changes(targets=[cst.AssignTarget(t.elements[2].value)], value=new)
        return updated

    def leave_Call(self, original, updated):
        if not self.kept(self.current_class) or self.current_function != "forward":
            return updated
        if m.matches(updated.func, m.Attribute(attr=m.Name("reshape") | m.Name("view"))) and len(updated.args) == 3:
            first = [a.value for a in updated.args[:2]]
            if all(isinstance(a, cst.Name) and a.value in self._batch for a in first):
                return updated.func.value  # type: ignore[attr-defined]
        if m.matches(updated.func, m.Attribute(attr=m.Name("reshape") | m.Name("view"))) and len(updated.args) == 1 \
                and m.matches(updated.args[0].value, m.Name(m.MatchIfTrue(lambda n: n in getattr(self, "_seq_shapes", ())))):
            return updated.func.value  # type: ignore[attr-defined]
        return updated
