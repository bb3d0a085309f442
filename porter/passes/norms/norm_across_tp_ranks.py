"""A q/k norm that spans heads (all heads at once, or one weight per head) under tensor parallelism."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import findall, self_attr
from porter.passes.base import Example, Rule

HELPER = "_norm_across_tp_ranks"


class NormAcrossTpRanks(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT120"
    name = "norm-across-tp-ranks"
    why = (
        "Some models normalise q or k with parameters that span the heads: one norm over the whole "
        "projection (`q_norm = RMSNorm(num_heads * head_dim)`), or one weight per head "
        "(`LayerNorm((num_heads, head_dim))`, a list of per-head norms). Under tensor parallelism "
        "each rank holds only its heads, so the statistics would cover part of the width, or the "
        "weights would not be this rank's heads. The port gathers the heads from every rank, "
        "applies the norm as HF does to all of them, and keeps its own part (vLLM's own OLMoE does the "
        "same); ranks that hold copies of replicated KV heads contribute one copy. At TP=1 the norm "
        "is called as before."
    )
    examples = [
        Example(
            "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.head_dim = config.head_dim\n"
            "        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n"
            "        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
            "        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
            "        self.q_norm = RMSNorm(config.num_heads * self.head_dim)\n"
            "        self.k_norm = LayerNorm((config.num_kv_heads, self.head_dim))\n\n"
            "    def forward(self, x):\n        q = self.q_norm(self.q_proj(x))\n        k = self.k_norm(self.k_proj(x))\n"
            "        out, _ = attention_interface(self, q, k, self.v_proj(x), None)\n"
            "        return out\n",
            "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.head_dim = config.head_dim\n"
            "        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n"
            "        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
            "        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
            "        self.q_norm = RMSNorm(config.num_heads * self.head_dim)\n"
            "        self.k_norm = LayerNorm((config.num_kv_heads, self.head_dim))\n\n"
            "    def forward(self, x):\n"
            "        q = self._norm_across_tp_ranks(self.q_norm, self.q_proj(x), self.qkv_proj.total_num_heads)\n"
            "        k = self._norm_across_tp_ranks(self.k_norm, self.k_proj(x), self.qkv_proj.total_num_kv_heads, per_head=True)\n"
            "        out, _ = attention_interface(self, q, k, self.v_proj(x), None)\n"
            "        return out\n\n"
            "    def _norm_across_tp_ranks(\n"
            "        self, norm: nn.Module, x: torch.Tensor, total_heads: int, per_head: bool = False\n"
            "    ) -> torch.Tensor:\n"
            '        """`norm` spans all `total_heads` heads of a projection that TP splits by heads (one\n'
            "        weight per head when `per_head`): apply it to the heads gathered from every rank and keep\n"
            "        this rank's part (ranks holding copies of replicated KV heads contribute one copy).\"\"\"\n"
            "        size = x.shape[-1]\n"
            "        full_size = total_heads * self.head_dim\n"
            "        copies = 1\n"
            "        if size != full_size:\n"
            "            parts = tensor_model_parallel_all_gather(x.contiguous()).split(size, dim=-1)\n"
            "            copies = len(parts) * size // full_size\n"
            "            x = torch.cat(parts[::copies], dim=-1)\n"
            "        x = norm(x.unflatten(-1, (total_heads, -1))).flatten(-2) if per_head else norm(x)\n"
            "        if size == full_size:\n"
            "            return x\n"
            "        return x.split(size, dim=-1)[get_tensor_model_parallel_rank() // copies]\n",
        )
    ]

    def leave_Call(self, original, updated):
        cls = self.current_class
        if not self.kept(cls) or self.current_function != "forward":
            return updated
        attr = self_attr(updated.func)
        norm = self.plan.head_norms.get(cls, {}).get(attr or "")
        if norm is None or len(updated.args) != 1:
            return updated
        attn = self.plan.attention(cls)
        qkv = attn.q if attn.packed else "qkv_proj"  # type: ignore[union-attr]
        total = f"self.{qkv}.total_num_kv_heads" if norm.kv else f"self.{qkv}.total_num_heads"
        args = [cst.Arg(cst.parse_expression(f"self.{attr}")),
                updated.args[0].with_changes(comma=cst.MaybeSentinel.DEFAULT),
                cst.Arg(cst.parse_expression(total))]
        if norm.per_head:
            args.append(cst.Arg(cst.Name("True"), keyword=cst.Name("per_head"),
                                equal=cst.AssignEqual(whitespace_before=cst.SimpleWhitespace(""),
                                                      whitespace_after=cst.SimpleWhitespace(""))))
        return cst.Call(func=cst.parse_expression(f"self.{HELPER}"), args=args)

    def leave_ClassDef(self, original, updated):
        cls = self.current_class
        super().leave_ClassDef(original, updated)
        if not self.kept(cls) or not self.plan.head_norms.get(cls or ""):
            return updated
        if not findall(updated, m.Attribute(value=m.Name("self"), attr=m.Name(HELPER))):
            return updated
        head_dim = self.plan.attention(cls).head_dim  # type: ignore[union-attr]
        gather = self.ctx.use("tensor_model_parallel_all_gather")
        rank = self.ctx.use("get_tensor_model_parallel_rank")
        helper = cst.parse_statement(
            f"def {HELPER}(\n"
            "    self, norm: nn.Module, x: torch.Tensor, total_heads: int, per_head: bool = False\n"
            ") -> torch.Tensor:\n"
            '    """`norm` spans all `total_heads` heads of a projection that TP splits by heads (one\n'
            "        weight per head when `per_head`): apply it to the heads gathered from every rank and keep\n"
            "        this rank's part (ranks holding copies of replicated KV heads contribute one copy).\"\"\"\n"
            "    size = x.shape[-1]\n"
            f"    full_size = total_heads * {head_dim}\n"
            "    copies = 1\n"
            "    if size != full_size:\n"
            f"        parts = {gather}(x.contiguous()).split(size, dim=-1)\n"
            "        copies = len(parts) * size // full_size\n"
            "        x = torch.cat(parts[::copies], dim=-1)\n"
            "    x = norm(x.unflatten(-1, (total_heads, -1))).flatten(-2) if per_head else norm(x)\n"
            "    if size == full_size:\n"
            "        return x\n"
            f"    return x.split(size, dim=-1)[{rank}() // copies]\n"
        )
        body = [*updated.body.body, helper.with_changes(leading_lines=[cst.EmptyLine(indent=False)])]
        return updated.with_changes(body=updated.body.with_changes(body=body))
