"""A norm over a whole q/k projection (all heads at once) under tensor parallelism."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, self_attr
from porter.passes.base import Example, Rule
from porter.plan import linear_args

HELPER = "_norm_across_tp_ranks"


def full_width_norms(ctx, cls: str) -> list[str]:
    """Norm sub-modules of an attention class built over the full output width of its q or k
    projection (`q_norm = Norm(num_heads * head_dim)`), read from the HF source."""
    attn = ctx.plan.attention(cls)
    info = ctx.idx.classes.get(cls)
    if attn is None or info is None or attn.packed:
        return []
    widths = set()
    for proj in (attn.q, attn.k):
        sub = info.submodules.get(proj)
        if sub is not None:
            widths.add(linear_args(sub.call)[1])
    found = []
    for attr, sub in info.submodules.items():
        if attr in (attn.q, attn.k, attn.v, attn.o) or not sub.call.args:
            continue
        is_norm = sub.ctor in ctx.plan.norms or "norm" in (sub.ctor or "").lower()
        if is_norm and code(sub.call.args[0].value) in widths:
            found.append(attr)
    return found


class NormAcrossTpRanks(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT120"
    name = "norm-across-tp-ranks"
    why = (
        "Some models normalise q or k over the whole projection (`q_norm = RMSNorm(num_heads * "
        "head_dim)`), not per head. Under tensor parallelism each rank holds only its heads of that "
        "projection, so the norm's statistics would cover a fraction of the width and its weight "
        "would not match. The port gathers the heads from every rank, normalises the full width with "
        "the full weight and keeps its own part (vLLM's own OLMoE does the same); ranks that hold "
        "copies of replicated KV heads contribute one copy. At TP=1 the norm is called as before."
    )
    examples = [
        Example(
            "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.head_dim = config.head_dim\n"
            "        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n"
            "        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
            "        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
            "        self.q_norm = RMSNorm(config.num_heads * self.head_dim)\n\n"
            "    def forward(self, x):\n        q = self.q_norm(self.q_proj(x))\n"
            "        out, _ = attention_interface(self, q, self.k_proj(x), self.v_proj(x), None)\n"
            "        return out\n",
            "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.head_dim = config.head_dim\n"
            "        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n"
            "        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
            "        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
            "        self.q_norm = RMSNorm(config.num_heads * self.head_dim)\n\n"
            "    def forward(self, x):\n        q = self._norm_across_tp_ranks(self.q_norm, self.q_proj(x))\n"
            "        out, _ = attention_interface(self, q, self.k_proj(x), self.v_proj(x), None)\n"
            "        return out\n\n"
            "    def _norm_across_tp_ranks(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:\n"
            '        """`norm` spans every head of a projection that TP splits by heads: normalise the\n'
            "        heads gathered from all ranks, keep this rank's part (ranks holding copies of\n"
            '        replicated KV heads contribute one copy)."""\n'
            "        size = x.shape[-1]\n"
            "        width = norm.weight.shape[0]\n"
            "        if size == width:\n"
            "            return norm(x)\n"
            "        parts = tensor_model_parallel_all_gather(x.contiguous()).split(size, dim=-1)\n"
            "        copies = len(parts) * size // width\n"
            "        full = norm(torch.cat(parts[::copies], dim=-1))\n"
            "        return full.split(size, dim=-1)[get_tensor_model_parallel_rank() // copies]\n",
        )
    ]

    def leave_Call(self, original, updated):
        cls = self.current_class
        if not self.kept(cls) or self.current_function != "forward":
            return updated
        attr = self_attr(updated.func)
        if attr is None or attr not in full_width_norms(self.ctx, cls) or len(updated.args) != 1:
            return updated
        return cst.Call(func=cst.parse_expression(f"self.{HELPER}"),
                        args=[cst.Arg(cst.parse_expression(f"self.{attr}")),
                              updated.args[0].with_changes(comma=cst.MaybeSentinel.DEFAULT)])

    def leave_ClassDef(self, original, updated):
        cls = self.current_class
        super().leave_ClassDef(original, updated)
        if not self.kept(cls) or not full_width_norms(self.ctx, cls):
            return updated
        if not m.findall(updated, m.Attribute(value=m.Name("self"), attr=m.Name(HELPER))):
            return updated
        gather = self.ctx.use("tensor_model_parallel_all_gather")
        rank = self.ctx.use("get_tensor_model_parallel_rank")
        helper = cst.parse_statement(
            f"def {HELPER}(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:\n"
            '    """`norm` spans every head of a projection that TP splits by heads: normalise the\n'
            "        heads gathered from all ranks, keep this rank's part (ranks holding copies of\n"
            '        replicated KV heads contribute one copy)."""\n'
            "    size = x.shape[-1]\n"
            "    width = norm.weight.shape[0]\n"
            "    if size == width:\n"
            "        return norm(x)\n"
            f"    parts = {gather}(x.contiguous()).split(size, dim=-1)\n"
            "    copies = len(parts) * size // width\n"
            "    full = norm(torch.cat(parts[::copies], dim=-1))\n"
            f"    return full.split(size, dim=-1)[{rank}() // copies]\n"
        )
        body = [*updated.body.body, helper.with_changes(leading_lines=[cst.EmptyLine(indent=False)])]
        return updated.with_changes(body=updated.body.with_changes(body=body))
