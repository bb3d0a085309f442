"""Refusals of a rotary module of remote code (rule engine-rope): what its tables depend on that the
engine's get_rope does not compute."""

from __future__ import annotations

from porter.plan.refusals import Refusal

ROTARY_MODULE_VALUE_ARG = Refusal(
    "rotary module {cls} handed `{param}`, which its inverse frequencies are computed from (dynamic NTK "
    "scaling): the engine's get_rope computes them from the base and dims alone, and no rule shows the "
    "value is the module's default",
    "import torch\nfrom torch import nn\n\n\nclass Rot(nn.Module):\n    def __init__(self, dim, base=10000):\n"
    "        super().__init__()\n        self.dim = dim\n        self.base = base\n"
    "        self.inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))\n\n"
    "    def forward(self, n, alpha=1.0):\n        base = self.base * alpha\n"
    "        self.inv_freq = 1.0 / (base ** (torch.arange(0, self.dim, 2).float() / self.dim))\n"
    "        t = torch.outer(torch.arange(n).float(), self.inv_freq)\n"
    "        return torch.cat((t, t), dim=-1)[None, :, None, :]\n\n\n"
    "def rotate_half(x):\n    x1, x2 = x.chunk(2, dim=-1)\n    return torch.cat((-x2, x1), dim=-1)\n\n\n"
    "def apply_rotary_pos_emb(t, f):\n    return t * f.cos() + rotate_half(t) * f.sin()\n\n\n"
    "class Attn(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.head_dim = config.hidden_size // config.num_attention_heads\n"
    "        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)\n"
    "        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)\n"
    "        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)\n"
    "        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)\n"
    "        self.rotary_emb = Rot(self.head_dim, base=config.rope_theta)\n\n"
    "    def forward(self, x, alpha):\n        q = self.q_proj(x)\n        k = self.k_proj(x)\n"
    "        v = self.v_proj(x)\n        f = self.rotary_emb(x.shape[1], alpha=alpha)\n"
    "        q = apply_rotary_pos_emb(q, f)\n        k = apply_rotary_pos_emb(k, f)\n"
    "        out, _ = attention_interface(self, q, k, v, None)\n        return self.o_proj(out)\n",
    "<example>:42: rotary module Rot handed `alpha`, which its inverse frequencies are computed from (dynamic NTK "
    "scaling): the engine's get_rope computes them from the base and dims alone, and no rule shows the value is "
    "the module's default in Attn: self.rotary_emb(x.shape[1], alpha=alpha) (rule engine-rope)",
    rule="engine-rope",
)
