"""PT331 chunked-act-and-mul: the rule `ChunkedActAndMul`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import assigned_names, code, find_method, findall, names_in, self_attr
from porter.passes.base import Example, Rule

_MLP = (
    "from torch import nn\n\n\nclass MLP(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, "
    "bias=False)\n        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False)\n"
    "        self.activation_fn = {act}(config.hidden_act)\n\n    def forward(self, hidden_states):\n{body}"
)
_BEFORE = _MLP.format(act="get_act_fn", body=(
    "        up_states, _ = self.gate_up_proj(hidden_states)\n        gate, up_states = up_states.chunk(2, dim=-1)\n"
    "        up_states = up_states * self.activation_fn(gate)\n        return self.down_proj(up_states)[0]\n"))
_AFTER = _MLP.format(act="get_act_and_mul_fn", body=(
    "        up_states, _ = self.gate_up_proj(hidden_states)\n        up_states = self.activation_fn(up_states)\n"
    "        return self.down_proj(up_states)[0]\n"))
# the activation on the second half: the engine's kernel activates the first, so it stays
_SECOND = _BEFORE.replace("up_states * self.activation_fn(gate)", "gate * self.activation_fn(up_states)")
_INDEXED_BEFORE = _MLP.format(act="get_act_fn", body=(
    "        chunks = self.gate_up_proj(hidden_states)[0].chunk(2, dim=-1)\n"
    "        return self.down_proj(self.activation_fn(chunks[0]) * chunks[1])[0]\n"))
_INDEXED_AFTER = _MLP.format(act="get_act_and_mul_fn", body=(
    "        return self.down_proj(self.activation_fn(self.gate_up_proj(hidden_states)[0]))[0]\n"))

_CHUNK = m.Call(func=m.Attribute(attr=m.Name("chunk")), args=[
    m.Arg(m.Integer("2"), keyword=None),
    m.Arg(m.UnaryOperation(operator=m.Minus(), expression=m.Integer("1")), keyword=m.Name("dim") | None)])


def _halves_linears(init: cst.FunctionDef, merged: str) -> set[str]:
    """Attributes bound to a merged column projection of two equal outputs (`[n] * 2` or `[n, n]`):
    on every rank its output is this rank's first half, then its second half, of equal widths."""
    out = set()
    for a in findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))],
                                    value=m.Call(func=m.Name(merged)))):
        args = a.value.args  # type: ignore[attr-defined]
        sizes = args[1].value if len(args) > 1 and args[1].keyword is None else None
        equal = m.matches(sizes, m.BinaryOperation(left=m.List([m.Element()]), operator=m.Multiply(), right=m.Integer("2"))) \
            or (isinstance(sizes, cst.List) and len(sizes.elements) == 2
                and code(sizes.elements[0].value) == code(sizes.elements[1].value))
        if equal:
            out.add(self_attr(a.targets[0].target))  # type: ignore[attr-defined]
    return out


def _projection(node: cst.BaseExpression, linears: set[str]) -> bool:
    """`self.<linear>(x)[0]`."""
    return m.matches(node, m.Subscript(value=m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(
        m.MatchIfTrue(lambda a: a in linears)))), slice=[m.SubscriptElement(m.Index(m.Integer("0")))]))


def _bound_output(st: cst.BaseStatement, name: str, linears: set[str]) -> bool:
    """`name, _ = self.<linear>(x)` or `name = self.<linear>(x)[0]`."""
    if not (isinstance(st, cst.SimpleStatementLine) and len(st.body) == 1 and isinstance(st.body[0], cst.Assign)):
        return False
    a = st.body[0]
    if len(a.targets) != 1:
        return False
    t = a.targets[0].target
    if m.matches(t, m.Name(name)):
        return _projection(a.value, linears)
    return m.matches(t, m.Tuple([m.Element(m.Name(name)), m.Element(m.Name())])) and m.matches(
        a.value, m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(m.MatchIfTrue(lambda x: x in linears)))))


def _reads(st: cst.CSTNode) -> set[str]:
    """Names a statement reads (a plain assignment's targets are not reads)."""
    if isinstance(st, cst.SimpleStatementLine) and len(st.body) == 1 and isinstance(st.body[0], cst.Assign):
        a = st.body[0]
        plain = all(isinstance(t.target, cst.Name) or (isinstance(t.target, cst.Tuple) and all(
            isinstance(e.value, cst.Name) for e in t.target.elements)) for t in a.targets)
        if plain:
            return names_in(a.value)
    return names_in(st)


def _assigned(st: cst.CSTNode) -> set[str]:
    out: set[str] = set()
    for a in findall(st, m.Assign() | m.AugAssign() | m.AnnAssign() | m.For()):
        for t in getattr(a, "targets", None) or [a]:
            out.update(assigned_names(t.target))  # type: ignore[attr-defined]
    return out


class ChunkedActAndMul(Rule):
    descend_methods = frozenset()  # works on __init__ and forward as a whole
    code = "PT331"
    name = "chunked-act-and-mul"
    why = (
        "A gated MLP written with one projection whose output is cut in two, `gate, up = "
        "self.gate_up_proj(x).chunk(2, dim=-1)` and `up * act(gate)` (Phi-3, GLM, Granite-MoE's shared "
        "MLP, ModernBERT), is what the engine's act-and-mul kernel computes: `act(y[:d]) * y[d:]` "
        "(`get_act_and_mul_fn`, as vLLM's own phi3 builds it). Exact where the projection is a merged "
        "column projection of two equal halves (each rank holds its gate rows, then its up rows, so "
        "`chunk(2)` splits at the shard boundary), the first half is the activated one, and gate and up "
        "are read nowhere else; not where the config defaults to an activation the engine has no "
        "act-and-mul kernel for (rules/hf_strip.yaml: engine_act_and_mul)."
    )
    examples = [
        Example(_BEFORE, _AFTER, seed={"engine_symbols": {"MergedColumnParallelLinear", "get_act_fn"}}),
        Example(_INDEXED_BEFORE, _INDEXED_AFTER, seed={"engine_symbols": {"MergedColumnParallelLinear", "get_act_fn"}}),
        Example(_SECOND, _SECOND, seed={"engine_symbols": {"MergedColumnParallelLinear", "get_act_fn"}}),
    ]

    @classmethod
    def applies(cls, ctx) -> bool:
        return {"MergedColumnParallelLinear", "get_act_fn"} <= ctx.engine_symbols

    def leave_ClassDef(self, original, updated):
        name = updated.name.value
        super().leave_ClassDef(original, updated)
        if self.scope or not self.kept(name):
            return updated
        init, fwd = find_method(updated, "__init__"), find_method(updated, "forward")
        if init is None or fwd is None or not isinstance(fwd.body, cst.IndentedBlock):
            return updated
        linears = _halves_linears(init, self.ctx.bound_name("MergedColumnParallelLinear"))
        acts = self._fusable_acts(init)
        if not linears or not acts:
            return updated
        found = self._fuse(fwd, linears, acts, updated)
        if found is None:
            return updated
        new_fwd, act = found
        new_init = init.with_changes(body=init.body.with_changes(body=[self._act_and_mul(st, act) for st in init.body.body]))
        body = [new_init if s is init else new_fwd if s is fwd else s for s in updated.body.body]
        self.mark(f"{name}.forward")
        self.mark(f"{name}.__init__")
        return updated.with_changes(body=updated.body.with_changes(body=body))

    def _fusable_acts(self, init: cst.FunctionDef) -> set[str]:
        """Attributes bound to `get_act_fn(config.X)` where X's default has an act-and-mul kernel."""
        get = self.ctx.bound_name("get_act_fn")
        out = set()
        for a in findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))],
                                        value=m.Call(func=m.Name(get), args=[m.Arg(keyword=None)]))):
            key = a.value.args[0].value  # type: ignore[attr-defined]
            if m.matches(key, m.Attribute(value=m.Name("config"), attr=m.Name())):
                ok = key.attr.value not in self.plan.unfusable_activations  # type: ignore[attr-defined]
            else:
                ok = m.matches(key, m.SimpleString()) and key.evaluated_value.lower() in self.ctx.table.engine_act_and_mul  # type: ignore[attr-defined]
            if ok:
                out.add(self_attr(a.targets[0].target))  # type: ignore[attr-defined]
        return out

    def _act_and_mul(self, st: cst.BaseStatement, act: str) -> cst.BaseStatement:
        target = m.AssignTarget(m.Attribute(value=m.Name("self"), attr=m.Name(act)))
        if isinstance(st, cst.SimpleStatementLine) and m.matches(st.body[0], m.Assign(targets=[target])):
            value = st.body[0].value  # type: ignore[attr-defined]
            return st.with_changes(body=[st.body[0].with_changes(value=value.with_changes(
                func=cst.Name(self.ctx.use("get_act_and_mul_fn"))))])
        return st

    def _fuse(self, fwd: cst.FunctionDef, linears: set[str], acts: set[str], cls: cst.ClassDef):
        body = list(fwd.body.body)  # type: ignore[attr-defined]
        for i, st in enumerate(body):
            if not (isinstance(st, cst.SimpleStatementLine) and len(st.body) == 1 and m.matches(st.body[0], m.Assign(
                    targets=[m.AssignTarget()], value=_CHUNK))):
                continue
            chunk = st.body[0]
            source = chunk.value.func.value  # type: ignore[attr-defined]
            if isinstance(source, cst.Name):
                # the projection's output, bound just before (nothing in between rebinds it)
                k = next((k for k in range(i - 1, -1, -1) if source.value in _assigned(body[k])), None)
                if k is None or not _bound_output(body[k], source.value, linears):
                    continue
            elif not _projection(source, linears):
                continue
            target = chunk.targets[0].target
            if m.matches(target, m.Tuple([m.Element(m.Name()), m.Element(m.Name())])):
                gate, up = (e.value.value for e in target.elements)  # type: ignore[attr-defined]
                reads = (m.Name(gate), m.Name(up))
                names = {gate, up}
            elif isinstance(target, cst.Name):
                c = target.value
                reads = tuple(m.Subscript(value=m.Name(c), slice=[m.SubscriptElement(m.Index(m.Integer(n)))]) for n in "01")
                names = {c}
            else:
                continue
            fused = self._product(body, i, reads, names, acts, source, cls)
            if fused is not None:
                j, new, act = fused
                out = [s for k, s in enumerate(body) if k != i]
                out[j - 1] = new
                if body[i].leading_lines and not new.leading_lines:  # type: ignore[attr-defined]
                    out[j - 1] = new.with_changes(leading_lines=body[i].leading_lines)  # type: ignore[attr-defined]
                return fwd.with_changes(body=fwd.body.with_changes(body=out)), act
        return None

    def _product(self, body, i, reads, names, acts, source, cls):
        """The statement after the chunk holding `act(gate) * up`, gate and up read nowhere else, and
        the chunk's names not read after it unless it binds them again."""
        gate_read, up_read = reads
        for j in range(i + 1, len(body)):
            st = body[j]
            if not (names & _reads(st)):
                if (names | (names_in(source) if not isinstance(source, cst.Name) else {source.value})) & _assigned(st):
                    return None
                continue
            acted = m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(m.MatchIfTrue(lambda a: a in acts))),
                           args=[m.Arg(gate_read, keyword=None)])
            product = m.BinaryOperation(operator=m.Multiply(), left=acted, right=up_read) | m.BinaryOperation(
                operator=m.Multiply(), left=up_read, right=acted)
            hits = findall(st, product)
            if len(hits) != 1:
                return None
            hit = hits[0]
            call = hit.left if m.matches(hit.left, acted) else hit.right  # type: ignore[attr-defined]
            act = call.func.attr.value
            if len(findall(cls, m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(act))))) != 1:
                return None  # the activation is called elsewhere too: it stays the plain one
            if names & _reads(st.deep_replace(hit, cst.Name("_"))):
                return None  # gate or up read besides the product
            new = st.deep_replace(hit, call.with_changes(args=[cst.Arg(source)]))
            rebound = _assigned(new)
            if any(n not in rebound and n in _reads(s) for s in body[j + 1:] for n in names):
                return None
            return j, new, act
        return None
