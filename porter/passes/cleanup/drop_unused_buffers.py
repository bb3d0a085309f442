"""Drop non-persistent buffers the port never reads (HF's precomputed causal masks)."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import findall, names_in, self_attr
from porter.passes.base import Example, Rule

_BUFFER = m.Call(func=m.Attribute(value=m.Name("nn"), attr=m.Name("Buffer")),
                 args=[m.ZeroOrMore(), m.Arg(keyword=m.Name("persistent"), value=m.Name("False")), m.ZeroOrMore()])

# remote code's older spelling: `self.register_buffer("bias", torch.tril(...), persistent=False)`
_REGISTER = m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name("register_buffer")),
                   args=[m.Arg(m.SimpleString(), keyword=None), m.Arg(keyword=None),
                         m.Arg(keyword=m.Name("persistent"), value=m.Name("False"))])


class DropUnusedBuffers(Rule):
    descend_methods = frozenset()
    code = "PT126"
    name = "drop-unused-buffers"
    why = (
        "Some HF models precompute a causal mask as a non-persistent buffer "
        "(`self.bias = nn.Buffer(torch.tril(torch.ones(max_pos, max_pos)), persistent=False)`, "
        "GPTBigCode): max_position² booleans allocated on every rank. Once the mask plumbing is gone "
        "nothing in the port reads it, and being non-persistent it is not in the checkpoint either, "
        "so the assignment (and the locals only it used) is removed. Buffers the port still reads "
        "(Gemma's `embed_scale`) stay."
    )
    @classmethod
    def applies(cls, ctx) -> bool:
        return "Buffer" in ctx.idx.identifiers or "register_buffer" in ctx.idx.identifiers

    examples = [
        Example(
            "class M(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)\n"
            "        n = config.max_position_embeddings\n"
            "        bias = torch.tril(torch.ones((n, n)))\n"
            "        if config.local:\n            bias = torch.bitwise_xor(bias, torch.tril(bias, -config.window))\n"
            "        self.bias = nn.Buffer(bias, persistent=False)\n"
            "        self.scale = nn.Buffer(torch.tensor(2.0), persistent=False)\n\n"
            "    def forward(self, input_ids):\n        return self.wte(input_ids) * self.scale\n",
            "class M(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)\n"
            "        self.scale = nn.Buffer(torch.tensor(2.0), persistent=False)\n\n"
            "    def forward(self, input_ids):\n        return self.wte(input_ids) * self.scale\n",
        ),
        Example(  # remote code registers it by name
            "class M(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        n = config.max_position_embeddings\n"
            "        self.register_buffer(\"bias\", torch.tril(torch.ones((n, n))), persistent=False)\n"
            "        self.register_buffer(\"scale\", torch.tensor(2.0), persistent=False)\n\n"
            "    def forward(self, x):\n        return x * self.scale\n",
            "class M(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.register_buffer(\"scale\", torch.tensor(2.0), persistent=False)\n\n"
            "    def forward(self, x):\n        return x * self.scale\n",
        ),
    ]

    def leave_ClassDef(self, original, updated):
        if len(self.scope) != 1 or not self.kept(self.current_class):
            return super().leave_ClassDef(original, updated)
        methods = [st for st in updated.body.body if isinstance(st, cst.FunctionDef)]
        init = next((f for f in methods if f.name.value == "__init__"), None)
        if init is None or not any(self._buffer_attr(st) for st in init.body.body):
            return super().leave_ClassDef(original, updated)
        read = {self_attr(a) for f in methods for a in findall(f, m.Attribute(value=m.Name("self")))
                if f is not init} | {self_attr(a) for st in init.body.body
                                     for a in findall(st, m.Attribute(value=m.Name("self")))
                                     if not self._buffer_attr(st)}
        body, freed = [], set()
        for st in init.body.body:
            attr = self._buffer_attr(st)
            if attr and attr not in read:
                freed |= names_in(self._buffer_value(st))
                continue
            body.append(st)
        if len(body) == len(init.body.body):
            return super().leave_ClassDef(original, updated)
        body = self._drop_locals(body, freed)
        new_init = init.with_changes(body=init.body.with_changes(body=body))
        updated = updated.with_changes(body=updated.body.with_changes(body=[
            new_init if st is init else st for st in updated.body.body]))
        self.mark(f"{self.current_class}.__init__")
        return super().leave_ClassDef(original, updated)

    @staticmethod
    def _buffer_attr(st: cst.CSTNode) -> str | None:
        if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(
                m.Attribute(value=m.Name("self")))], value=_BUFFER)])):
            return self_attr(st.body[0].targets[0].target)  # type: ignore[attr-defined]
        if m.matches(st, m.SimpleStatementLine(body=[m.Expr(_REGISTER)])):
            return st.body[0].value.args[0].value.evaluated_value  # type: ignore[attr-defined]
        return None

    @staticmethod
    def _buffer_value(st: cst.CSTNode) -> cst.BaseExpression:
        value = st.body[0].value  # type: ignore[attr-defined]
        return value.args[1].value if m.matches(value, _REGISTER) else value

    @classmethod
    def _drop_locals(cls, body: list[cst.BaseStatement], freed: set[str]) -> list[cst.BaseStatement]:
        """The statements that only compute locals the dropped buffers read (GPT-Neo's `bias`, then
        banded under `if attention_type == "local":`, and the `max_positions` it was sized by) go,
        transitively, unless a kept statement reads one of them."""
        while True:
            gone = {i for i, st in enumerate(body) if (w := cls._locals_of(st)) and w <= freed}
            while True:
                read = set().union(*(names_in(st) for i, st in enumerate(body) if i not in gone))
                keep = {i for i in gone if cls._locals_of(body[i]) & read}  # type: ignore[operator]
                if not keep:
                    break
                gone -= keep
            if not gone:
                return body
            freed = freed | set().union(*(names_in(body[i]) for i in gone))
            body = [st for i, st in enumerate(body) if i not in gone]

    @classmethod
    def _locals_of(cls, st: cst.CSTNode) -> set[str] | None:
        """The locals a statement assigns when that is all it does (`x = ...`, or an `if` without
        `else` whose body only does that); None otherwise."""
        if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())])])):
            return {st.body[0].targets[0].target.value}  # type: ignore[attr-defined]
        if isinstance(st, cst.If) and st.orelse is None:
            inner = [cls._locals_of(s) for s in st.body.body]
            return set().union(*inner) if all(inner) else None
        return None
