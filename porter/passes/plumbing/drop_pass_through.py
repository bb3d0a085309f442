"""PT296 drop-pass-through: the rule `DropPassThrough`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, findall, param_names
from porter.passes.base import Example, Rule

_MODEL = (
    "from torch import nn\n\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)\n        self.first = 1\n\n"
    "    def forward(self, input_ids, logits_to_keep=0, cache=None):\n        h = self.embed_tokens(input_ids)\n"
    "        masks = {{}}\n        for i in range(2):\n{select}"
    "            h = h * 2\n        return h\n\n"
    "    def _select(self, h, masks, logits_to_keep, cache):\n"
    "        if seq_len(h) == 1 or not isinstance(logits_to_keep, int):\n            return h, masks\n"
    "        keep = slice(-logits_to_keep, None)\n        return h[:, keep], masks\n"
)


class DropPassThrough(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT296"
    name = "drop-pass-through"
    why = (
        "transformers 5.24's Gemma-4 cuts the sequence to the `logits_to_keep` positions before its KV-shared "
        "layers (`h, pos, masks = self._maybe_slice_kv_shared_inputs(h, pos, masks, logits_to_keep, cache=cache)`): "
        "a generate-time saving that only HF-only plumbing steers (`logits_to_keep`, the cache). The engine "
        "computes every position and picks the ones it samples itself, as HF does without that selection (its "
        "helper then hands its inputs back untouched). A statement that rebinds exactly the values it hands "
        "a method of the model, together with HF-only parameters of forward (rules/hf_strip.yaml strip_params), "
        "where that method has a `return` of those very inputs, goes; an `if` left empty goes with it, and "
        "the method once nothing calls it."
    )
    examples = [Example(
        _MODEL.format(select="            if i == self.first:\n"
                      "                h, masks = self._select(h, masks, logits_to_keep, cache=cache)\n"),
        _MODEL.format(select="").split("    def _select")[0].rstrip() + "\n",
    )]

    @classmethod
    def applies(cls, ctx) -> bool:
        return any(p in ctx.idx.identifiers for p in ctx.table.strip_params)

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        if len(self.scope) != 1 or updated.name.value != "forward" or cls not in self.ctx.idx.classes:
            return updated
        hf = set(param_names(updated)) & set(self.ctx.table.strip_params)
        info = self.ctx.idx.classes[cls]
        dropped = [st for st in findall(updated, m.SimpleStatementLine()) if self._pass_through(st, hf, info)]
        if not dropped:
            return updated
        self.mark(f"{cls}.forward")
        self._callees = {st.body[0].value.func.attr.value for st in dropped}  # type: ignore[attr-defined]
        return updated.visit(_Drop(dropped))

    def leave_ClassDef(self, original, updated):
        callees, self._callees = getattr(self, "_callees", set()), set()
        out = super().leave_ClassDef(original, updated)
        if not callees:
            return out
        used = {a.attr.value for a in findall(out, m.Attribute(value=m.Name("self")))}  # type: ignore[attr-defined]
        gone = callees - used  # the methods nothing calls any more
        return out.with_changes(body=out.body.with_changes(body=[
            st for st in out.body.body if not (isinstance(st, cst.FunctionDef) and st.name.value in gone)]))

    def _pass_through(self, st: cst.CSTNode, hf: set[str], info) -> bool:
        if not hf or not m.matches(st, m.SimpleStatementLine(body=[m.Assign(
                targets=[m.AssignTarget()], value=m.Call(func=m.Attribute(value=m.Name("self"))))])):
            return False
        a = st.body[0]  # type: ignore[attr-defined]
        t = a.targets[0].target
        targets = [code(e.value) for e in t.elements] if isinstance(t, cst.Tuple) else [code(t)]
        pos = [code(x.value) for x in a.value.args if x.keyword is None and not x.star]
        names = {code(x.value) for x in a.value.args}
        if pos[:len(targets)] != targets or not (names & hf) or \
                not (names - set(targets) - {"**kwargs", "kwargs"}) <= hf:
            return False
        method = info.method(a.value.func.attr.value)
        if method is None:
            return False
        params = param_names(method)[1:len(targets) + 1]
        back = f"{params[0]}" if len(params) == 1 else ", ".join(params)
        return any(r.value is not None and code(r.value).strip("()") == back for r in findall(method, m.Return()))  # type: ignore[attr-defined]


class _Drop(cst.CSTTransformer):
    """The dropped statements; an `if` they leave empty goes too."""

    def __init__(self, dropped: list[cst.CSTNode]) -> None:
        super().__init__()
        self.dropped = dropped
        self.emptied: list[cst.IndentedBlock] = []

    def leave_IndentedBlock(self, original, updated):
        body = [s for s in updated.body if not any(s.deep_equals(d) for d in self.dropped)]
        if len(body) == len(updated.body):
            return updated
        out = updated.with_changes(body=body or [cst.SimpleStatementLine([cst.Pass()])])
        if not body:
            self.emptied.append(out)
        return out

    def leave_If(self, original, updated):
        if any(updated.body is e for e in self.emptied) and updated.orelse is None:
            return cst.RemovalSentinel.REMOVE
        return updated
