"""Which value feeds which: a small forward-only dataflow over one `forward` method.

Each local name carries the set of *origins* it was computed from: sub-module calls
(`self.q_proj(...)` gives {"q_proj"}), parameters ("param:x") and the attention call ("@attn").
That is enough to tell the roles of projections by what they feed, not by their names:
the three linears whose outputs reach the query/key/value arguments of the attention call are
q/k/v; a linear reading the attention output is the output projection; a linear reading another
linear's output is row-parallel and the one it reads is column-parallel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import libcst as cst

from porter.analysis.cstutil import assigned_names, children, loop_module, names_in, param_names, self_call_attr

ATTN = "@attn"
_METADATA = {"dtype", "device"}


@dataclass
class Flow:
    module_inputs: dict[str, set[str]] = field(default_factory=dict)  # sub-module -> origins of its input
    attention_calls: list[tuple[cst.Call, list[set[str]]]] = field(default_factory=list)
    # origins of each attention call's mask argument (the fifth positional or `attention_mask=`)
    attention_masks: list[set[str]] = field(default_factory=list)
    returns: list[set[str]] = field(default_factory=list)


class _Flow:
    def __init__(self, submodules: set[str], is_attention_call, hf_only: frozenset[str],
                 linears: set[str], opaque: set[str]) -> None:
        self.submodules = submodules
        self.linears = linears
        self.opaque = opaque
        self.hf_only = hf_only
        self.is_attention_call = is_attention_call
        self.env: dict[str, set[str]] = {}
        self.loop_modules: dict[str, str] = {}
        self.flow = Flow()

    def origins(self, node: cst.CSTNode) -> set[str]:
        if isinstance(node, cst.Name):
            return set(self.env.get(node.value, set()))
        if isinstance(node, cst.Call):
            attr = self_call_attr(node)
            if attr is None and isinstance(node.func, cst.Name):
                attr = self.loop_modules.get(node.func.value)  # `for layer in self.layers: layer(h)`
            arg_origins: set[str] = set()
            for a in node.args:
                arg_origins |= self.origins(a.value)
            if attr is not None and attr in self.submodules:
                self.flow.module_inputs.setdefault(attr, set()).update(arg_origins)
                if attr in self.linears or attr in self.opaque:
                    return {attr}
                return {attr} | arg_origins  # norms and other leaf modules pass their input's origins on
            if self.is_attention_call(node):
                per_arg = [self.origins(a.value) for a in node.args if a.keyword is None]
                self.flow.attention_calls.append((node, per_arg))
                plain = [a.value for a in node.args if a.keyword is None and not a.star]
                mask = plain[4:5] or [a.value for a in node.args
                                      if a.keyword is not None and a.keyword.value == "attention_mask"]
                self.flow.attention_masks.append(self.origins(mask[0]) if mask else set())
                return {ATTN} | arg_origins
            return arg_origins | self.origins(node.func) if not isinstance(node.func, cst.Name) else arg_origins
        if isinstance(node, cst.Attribute):
            if node.attr.value in _METADATA:  # `key.dtype`: the tensor's type, not its values
                return set()
            return self.origins(node.value)
        out: set[str] = set()
        for child in children(node):
            out |= self.origins(child)
        return out

    def assign(self, targets: list[cst.BaseAssignTargetExpression], value: cst.BaseExpression) -> None:
        # `a, b = helper(x, y, ...)` keeps positional correspondence (apply_rotary_pos_emb(q, k, ...)).
        if (
            len(targets) == 1
            and isinstance(targets[0], cst.Tuple)
            and isinstance(value, cst.Call)
            and isinstance(value.func, cst.Name)
            and not self.is_attention_call(value)
            and len(value.args) >= len(targets[0].elements)
        ):
            self.origins(value)
            for el, arg in zip(targets[0].elements, value.args):
                for n in assigned_names(el.value):  # type: ignore[arg-type]
                    self.env[n] = self.origins(arg.value)
            return
        o = self.origins(value)
        for t in targets:
            for n in assigned_names(t):
                self.env[n] = set(o)

    def run(self, body: list[cst.CSTNode]) -> None:
        for st in body:
            self.statement(st)

    def statement(self, st: cst.CSTNode) -> None:
        if isinstance(st, cst.SimpleStatementLine):
            for small in st.body:
                if isinstance(small, cst.Assign):
                    self.assign([t.target for t in small.targets], small.value)
                elif isinstance(small, cst.AnnAssign) and small.value is not None:
                    self.assign([small.target], small.value)
                elif isinstance(small, cst.AugAssign):
                    for n in assigned_names(small.target):
                        self.env[n] = self.env.get(n, set()) | self.origins(small.value)
                elif isinstance(small, cst.Return) and small.value is not None:
                    self.flow.returns.append(self.origins(small.value))
                elif isinstance(small, cst.Expr):
                    self.origins(small.value)
        elif isinstance(st, cst.If):
            if names_in(st.test) & self.hf_only:
                return  # HF-only branch (cache update, mask building): not part of the port
            self.origins(st.test)
            self.run(list(st.body.body))
            if st.orelse is not None:
                self.statement(st.orelse if isinstance(st.orelse, cst.If) else st.orelse.body)
        elif isinstance(st, cst.IndentedBlock):
            self.run(list(st.body))
        elif isinstance(st, cst.For):
            o = self.origins(st.iter)
            for n in assigned_names(st.target):
                self.env[n] = o
            bound = loop_module(st)
            if bound and bound[1] in self.submodules:
                self.loop_modules[bound[0]] = bound[1]
            self.run(list(st.body.body))
        elif isinstance(st, (cst.With, cst.While)):
            self.run(list(st.body.body))


def forward_flow(
    fn: cst.FunctionDef, submodules: set[str], is_attention_call, hf_only: frozenset[str] = frozenset(),
    linears: set[str] | None = None, opaque: set[str] | None = None,
) -> Flow:
    """`opaque` sub-modules (ones holding their own projections) end a sharded region: their
    output does not carry their input's origins. Leaf modules (norms, activations) do."""
    f = _Flow(submodules, is_attention_call, hf_only, submodules if linears is None else linears,
              set() if opaque is None else opaque)
    for p in param_names(fn):
        if p != "self":
            f.env[p] = {f"param:{p}"}
    f.run(list(fn.body.body))
    return f.flow
