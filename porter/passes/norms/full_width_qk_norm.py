"""A q/k norm over the whole projection (not per head), applied to a rank's slice of it."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, findall, self_attr
from porter.passes.base import Example, Rule

HELPER = "tp_full_width_norm"


_HELPER_SRC = f'''
def {HELPER}(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`norm` spans the whole projection; `x` is this rank's slice of it: gather, normalise, split."""
    tp_size = {{world}}()
    if tp_size == 1:
        return norm(x)
    x = norm({{gather}}(x.contiguous()))
    return x.chunk(tp_size, dim=-1)[{{rank}}()].contiguous()
'''


class FullWidthQkNorm(Rule):
    code = "PT103"
    name = "full-width-qk-norm"
    why = (
        "Some attentions normalise the flat query/key projection as a whole (`q_norm = "
        "RMSNorm(hidden_size)`, OLMoE, OLMo-2), not per head. With tensor parallelism each rank "
        "holds only its heads' slice of q and k, so the norm's statistics and weight span more than "
        "the rank has: the slice is gathered from all ranks, normalised, and this rank's part taken "
        "back (`tp_full_width_norm`), as the engine's own ports do. Per-head norms (size head_dim) "
        "are left alone."
    )
    examples = [
        Example(
            "class ARMSNorm(nn.Module):\n    def forward(self, x):\n"
            "        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)\n\n\n"
            "class Attn(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.q_norm = ARMSNorm(config.hidden_size, eps=config.rms_norm_eps)\n\n"
            "    def forward(self, hidden_states):\n        qkv, _ = self.qkv_proj(hidden_states)\n"
            "        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)\n"
            "        q = self.q_norm(q)\n        return self.attn(q, k, v)\n",
            "class ARMSNorm(nn.Module):\n    def forward(self, x):\n"
            "        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)\n\n\n"
            "class Attn(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.q_norm = ARMSNorm(config.hidden_size, eps=config.rms_norm_eps)\n\n"
            "    def forward(self, hidden_states):\n        qkv, _ = self.qkv_proj(hidden_states)\n"
            "        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)\n"
            "        q = tp_full_width_norm(self.q_norm, q)\n        return self.attn(q, k, v)\n\n"
            + _HELPER_SRC.format(world="get_tensor_model_parallel_world_size",
                                 gather="tensor_model_parallel_all_gather",
                                 rank="get_tensor_model_parallel_rank"),
        ),
    ]

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self._used = False
        self._flat: set[str] = set()

    def _full_width_norms(self) -> set[str]:
        cls = self.current_class or ""
        info = self.ctx.idx.classes.get(cls)
        ap = self.plan.attention(cls) if self.plan.attentions else None
        if info is None or (ap is None and self.plan.causal_lm):
            return set()
        head_dim = ap.head_dim if ap else "self.head_dim"
        out = set()
        for attr, sub in info.submodules.items():
            if sub.ctor not in self.plan.norms or not sub.call.args:
                continue
            # a per-head norm has the head size; one on the flat slice of any other size spans
            # the whole projection (hidden_size, heads * head_dim, ...)
            if code(sub.call.args[0].value) not in (head_dim, "head_dim", "config.head_dim"):
                out.add(attr)
        return out

    def visit_FunctionDef(self, node):
        if node.name.value == "forward":
            # the flat per-rank q and k: the first two names a fused projection's split binds
            self._flat = set()
            for st in findall(node, m.Assign(targets=[m.AssignTarget(m.Tuple())],
                                               value=m.Call(func=m.Attribute(attr=m.Name("split"))))):
                els = st.targets[0].target.elements  # type: ignore[attr-defined]
                if len(els) == 3:
                    self._flat |= {e.value.value for e in els[:2] if isinstance(e.value, cst.Name)}
        # only a forward that splits a fused projection has calls to rewrite
        return super().visit_FunctionDef(node) and node.name.value == "forward" and bool(self._flat)

    def leave_Call(self, original, updated):
        if self.current_function != "forward" or not self.kept(self.current_class):
            return updated
        attr = self_attr(updated.func)
        if attr is None or len(updated.args) != 1 or not m.matches(updated.args[0].value, m.Name()):
            return updated
        if updated.args[0].value.value not in self._flat or attr not in self._full_width_norms():  # type: ignore[attr-defined]
            return updated
        self._used = True
        return cst.Call(func=cst.Name(HELPER), args=[cst.Arg(updated.func, comma=cst.Comma(
            whitespace_after=cst.SimpleWhitespace(" "))), cst.Arg(updated.args[0].value)])

    def leave_Module(self, original, updated):
        if not self._used:
            return updated
        src = _HELPER_SRC.format(world=self.ctx.use("get_tensor_model_parallel_world_size"),
                                 gather=self.ctx.use("tensor_model_parallel_all_gather"),
                                 rank=self.ctx.use("get_tensor_model_parallel_rank"))
        self.mark(HELPER)  # the new top-level function: `porter diff` labels it with this rule
        helper = [st.with_changes(leading_lines=[cst.EmptyLine(), cst.EmptyLine()]) if i == 0 else st
                  for i, st in enumerate(cst.parse_module(src).body)]
        return updated.with_changes(body=[*updated.body, *helper])
