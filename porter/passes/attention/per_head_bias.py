"""PT161 per-head-bias: the rule `PerHeadBias`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, findall, self_attr
from porter.passes.base import Example, Rule

# `self.P[None, None, :, None]`: one value per head against (batch, seq, heads, head_dim)
_NONE = m.SubscriptElement(m.Index(m.Name("None")))
_PER_HEAD = m.Subscript(value=m.Attribute(value=m.Name("self")), slice=[
    _NONE, _NONE, m.SubscriptElement(m.Slice(lower=None, upper=None, step=None)), _NONE])
_PARAM = m.Call(func=m.Attribute(attr=m.Name("Parameter")) | m.Name("Parameter"),
                args=[m.Arg(value=m.Call(func=m.Attribute(value=m.Name("torch"))), keyword=None)])

_ATTN = (
    "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
    "        super().__init__()\n        self.head_dim = config.head_dim\n"
    "        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n"
    "        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
    "        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
    "        self.gate_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n"
    "{param}\n"
    "    def forward(self, x):\n"
    "        q = self.q_proj(x)\n        k = self.k_proj(x)\n        v = self.v_proj(x)\n"
    "        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)\n"
    "        gate = self.gate_proj(x).view_as(out) + {read}\n"
    "        return out * torch.sigmoid(gate)\n"
)
_BEFORE_PARAM = "        self.gate_bias = nn.Parameter(torch.zeros({n}))\n"
_AFTER_PARAM = ("        self.gate_bias = nn.Parameter(torch.zeros(config.num_heads // "
                "get_tensor_model_parallel_world_size()))\n"
                "        self.gate_bias.weight_loader = sharded_weight_loader(0)\n")


class PerHeadBias(Rule):
    descend_methods = frozenset()  # works on the attention class as a whole
    code = "PT161"
    name = "per-head-bias"
    why = (
        "A learned value per attention head added to something viewed as the attention's output "
        "(Beam's gate: `gate = self.gate_proj(x).view_as(attn_output) + self.gate_bias[None, None, :, "
        "None]`, HF's output being (batch, seq, heads, head_dim)) broadcasts over the third axis. The "
        "engine's attention output is flat (tokens, heads * head_dim) and holds this rank's heads only: "
        "the parameter of `num_heads` values is built with `num_heads // tp_size` and loaded with "
        "`sharded_weight_loader(0)` (this rank's slice, in the order the column-parallel projections give "
        "the ranks their heads), and the read becomes `self.P.repeat_interleave(head_dim)`, each head's "
        "value repeated over its head_dim columns of the flat output: the same sum, exactly."
    )
    examples = [
        Example(_ATTN.format(param=_BEFORE_PARAM.format(n="config.num_heads"),
                             read="self.gate_bias[None, None, :, None]"),
                _ATTN.format(param=_AFTER_PARAM, read="self.gate_bias.repeat_interleave(self.head_dim)")),
        # sized by something else than the heads: not a per-head value, left alone
        Example(_ATTN.format(param=_BEFORE_PARAM.format(n="config.hidden_size"),
                             read="self.gate_bias[None, None, :, None]"),
                _ATTN.format(param=_BEFORE_PARAM.format(n="config.hidden_size"),
                             read="self.gate_bias[None, None, :, None]")),
    ]

    @classmethod
    def applies(cls, ctx) -> bool:
        return bool(ctx.plan.attentions)

    def leave_ClassDef(self, original, updated):
        cls = self.current_class
        super().leave_ClassDef(original, updated)
        attn = self.plan.attention(cls or "")
        if attn is None or self.scope:
            return updated
        methods = {f.name.value: f for f in updated.body.body if isinstance(f, cst.FunctionDef)}
        init, fwd = methods.get("__init__"), methods.get("forward")
        if init is None or fwd is None:
            return updated
        outputs = _attention_outputs(fwd)
        for st in init.body.body:
            attr, size = _head_sized_param(st, attn.num_heads)
            reads = [s for s in findall(fwd, m.Attribute(value=m.Name("self"), attr=m.Name(attr or "")))] if attr else []
            per_head = [s for s in findall(fwd, _PER_HEAD) if self_attr(s.value) == attr]  # type: ignore[attr-defined]
            if not attr or not reads or len(per_head) != len(reads) or not all(
                    _beside_output(fwd, s, outputs) for s in per_head):
                continue
            updated = self._rewrite(updated, st, attr, size, attn.head_dim)
            self.mark(f"{cls}.__init__")
            self.mark(f"{cls}.forward")
        return updated

    def _rewrite(self, cls: cst.ClassDef, st: cst.SimpleStatementLine, attr: str, size: cst.Arg,
                 head_dim: str) -> cst.ClassDef:
        tp = cst.parse_expression(f"{self.ctx.use('get_tensor_model_parallel_world_size')}()")
        sharded = st.deep_replace(size, size.with_changes(value=cst.BinaryOperation(size.value, cst.FloorDivide(), tp)))
        loader = cst.parse_statement(f"self.{attr}.weight_loader = {self.ctx.use('sharded_weight_loader')}(0)\n")
        read = cst.parse_expression(f"self.{attr}.repeat_interleave({head_dim})")

        class _Swap(cst.CSTTransformer):
            def leave_Subscript(self, original, updated):
                return read if m.matches(updated, _PER_HEAD) and self_attr(updated.value) == attr else updated

        body = []
        for f in cls.body.body:
            if isinstance(f, cst.FunctionDef) and f.name.value == "__init__":
                stmts = []
                for s in f.body.body:
                    stmts += [sharded, loader] if s is st else [s]
                f = f.with_changes(body=f.body.with_changes(body=stmts))
            elif isinstance(f, cst.FunctionDef) and f.name.value == "forward":
                f = f.visit(_Swap())  # type: ignore[assignment]
            body.append(f)
        return cls.with_changes(body=cls.body.with_changes(body=body))


def _head_sized_param(st: cst.CSTNode, heads: str) -> tuple[str | None, cst.Arg | None]:
    """`self.P = nn.Parameter(torch.F(HEADS, ...))` (one size, the attention's head count) -> (P, that arg)."""
    if not m.matches(st, m.SimpleStatementLine(body=[m.Assign(
            targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))], value=_PARAM)])):
        return None, None
    assign = st.body[0]  # type: ignore[attr-defined]
    sizes = [a for a in assign.value.args[0].value.args if a.keyword is None]
    if len(sizes) != 1 or code(sizes[0].value) != heads:
        return None, None
    return self_attr(assign.targets[0].target), sizes[0]


def _attention_outputs(fwd: cst.FunctionDef) -> set[str]:
    """Names bound to what the attention returns: the engine's `self.attn(...)`, or HF's interface
    called with the module first (`out, _ = attention_interface(self, q, k, v, ...)`)."""
    out = set()
    calls = m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name("attn"))) | m.Call(
        func=m.Name(), args=[m.Arg(m.Name("self"), keyword=None), m.AtLeastN(n=3)])
    for a in findall(fwd, m.Assign(value=calls)):
        t = a.targets[0].target  # type: ignore[attr-defined]
        t = t.elements[0].value if isinstance(t, cst.Tuple) else t
        if isinstance(t, cst.Name):
            out.add(t.value)
    return out


def _beside_output(fwd: cst.FunctionDef, read: cst.CSTNode, outputs: set[str]) -> bool:
    """READ is one side of a `+` whose other side is `X.view_as(OUT)`, OUT the attention's output."""
    view = m.Call(func=m.Attribute(attr=m.Name("view_as")),
                  args=[m.Arg(m.Name(m.MatchIfTrue(lambda n: n in outputs)))])
    return any((op.left is read and m.matches(op.right, view)) or (op.right is read and m.matches(op.left, view))
               for op in findall(fwd, m.BinaryOperation(operator=m.Add())))  # type: ignore[attr-defined]
