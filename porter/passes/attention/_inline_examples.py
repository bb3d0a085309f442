"""The before/after examples of the inline-eager-attention rule (PT150), kept beside it: each is
a spelling of attention it maps (and one it must leave unchanged)."""

from __future__ import annotations

from porter.passes.base import Example

_UNCHANGED_WHERE = (
    "class Attn(nn.Module):\n"
    "    def forward(self, q, k, v, keep):\n"
    "        w = torch.matmul(q, k.transpose(-1, -2))\n"
    "        w = torch.where(keep, w, torch.finfo(w.dtype).min)\n"
    "        w = nn.functional.softmax(w, dim=-1)\n"
    "        out = torch.matmul(w, v)\n"
    "        return out, w\n"
)

_UNCHANGED_BLEND = (
    "class Attn(nn.Module):\n"
    "    def __init__(self, n):\n"
    "        self.bias = nn.Buffer(torch.ones(n, n).view(1, 1, n, n), persistent=False)\n\n"
    "    def forward(self, q, k, v):\n"
    "        w = torch.matmul(q, k.transpose(-1, -2))\n"
    "        b = self.bias[:, :, : w.size(-2), : w.size(-1)]\n"
    "        w = w * b + -1e4 * (1 - b)\n"
    "        w = nn.functional.softmax(w, dim=-1)\n"
    "        out = torch.matmul(w, v)\n"
    "        return out, w\n"
)

_UNCHANGED_BADDBMM = (  # torch.baddbmm adds its product to a tensor that is no zeros (an uninitialised one)
    "class Attn(nn.Module):\n"
    "    def forward(self, q, k, v, attention_mask):\n"
    "        s = torch.empty(q.size(0), q.size(1), k.size(1), dtype=q.dtype)\n"
    "        w = torch.baddbmm(s, q, k.transpose(1, 2), beta=1.0, alpha=self.inv_norm)\n"
    "        w = nn.functional.softmax(w + attention_mask, dim=-1)\n"
    "        out = torch.matmul(w, v)\n"
    "        return out, w\n"
)

_UNCHANGED_KEY_SLICE = (
    "class Attn(nn.Module):\n"
    "    def forward(self, q, k, v, attention_mask):\n"
    "        w = torch.matmul(q, k.transpose(2, 3))\n"
    "        if attention_mask is not None:\n"
    "            if q.size(2) == 1:\n"
    "                attention_mask = attention_mask[:, :, :, -1:]\n"
    "            w = w + attention_mask\n"
    "        w = nn.functional.softmax(w, dim=-1)\n"
    "        out = torch.matmul(w, v)\n"
    "        return out, w\n"
)

EXAMPLES = [
    Example(
        "class Attn(nn.Module):\n"
        "    def __init__(self, config):\n        self.attn_dropout = nn.Dropout(config.attn_pdrop)\n\n"
        "    def forward(self, x, attention_mask):\n"
        "        q = self.q_proj(x)\n        k = self.k_proj(x)\n        v = self.v_proj(x)\n"
        "        q = q.to(torch.float32)\n"
        "        w = torch.matmul(q, k.transpose(-1, -2))\n"
        "        w = w / self.scale_attn\n"
        "        if attention_mask is not None:\n            w = w + attention_mask\n"
        "        w = nn.functional.softmax(w, dim=-1)\n"
        "        w = self.attn_dropout(w)\n"
        "        out = torch.matmul(w, v)\n"
        "        return self.o_proj(out), w\n",
        "class Attn(nn.Module):\n"
        "    def __init__(self, config):\n        self.attn_dropout = nn.Dropout(config.attn_pdrop)\n\n"
        "    def forward(self, x, attention_mask):\n"
        "        q = self.q_proj(x)\n        k = self.k_proj(x)\n        v = self.v_proj(x)\n"
        "        out, w = attention_interface(self, q, k, v, attention_mask, scaling=1 / self.scale_attn)\n"
        "        return self.o_proj(out), w\n",
    ),
    Example(
        "class Attn(nn.Module):\n"
        "    def _merge_heads(self, x):\n        return x.transpose(1, 2).flatten(2)\n\n"
        "    def forward(self, x, alibi, attention_mask):\n"
        "        q, k, v = self._reshape(self.qkv(x))\n"
        "        q = q.reshape(b * self.num_heads, -1, self.head_dim)\n"
        "        k = k.reshape(b * self.num_heads, -1, self.head_dim).transpose(-1, -2)\n"
        "        s = alibi.baddbmm(batch1=q, batch2=k, beta=self.beta, alpha=self.inv_norm_factor)\n"
        "        w = s.view(b, self.num_heads, n, -1) + attention_mask\n"
        "        p = F.softmax(w, dim=-1, dtype=torch.float32)\n"
        "        ctx = torch.bmm(p.view(b * self.num_heads, n, -1), v)\n"
        "        ctx = self._merge_heads(ctx)\n"
        "        return self.dense(ctx)\n",
        "class Attn(nn.Module):\n"
        "    def forward(self, x, alibi, attention_mask):\n"
        "        q, k, v = self._reshape(self.qkv(x))\n"
        "        ctx, p = attention_interface(self, q, k, v, attention_mask, scaling=self.inv_norm_factor, alibi=alibi)\n"
        "        return self.dense(ctx)\n",
    ),
    # a causal buffer masks the scores through `torch.where`; GPT-Neo's local layers band it
    # (a sliding window), and nothing scales the scores (scaling=1.0)
    Example(
        "class Attn(nn.Module):\n"
        "    def __init__(self, config, attention_type):\n"
        "        self.config = config\n        self.attention_type = attention_type\n"
        "        n = config.max_position_embeddings\n"
        "        bias = torch.tril(torch.ones((n, n), dtype=bool)).view(1, 1, n, n)\n"
        "        if attention_type == \"local\":\n"
        "            bias = torch.bitwise_xor(bias, torch.tril(bias, -config.window_size))\n"
        "        self.bias = nn.Buffer(bias, persistent=False)\n\n"
        "    def forward(self, q, k, v, attention_mask):\n"
        "        w = torch.matmul(q, k.transpose(-1, -2))\n"
        "        query_length, key_length = q.size(-2), k.size(-2)\n"
        "        causal_mask = self.bias[:, :, key_length - query_length : key_length, :key_length]\n"
        "        mask_value = torch.finfo(w.dtype).min\n"
        "        mask_value = torch.tensor(mask_value, dtype=w.dtype, device=w.device)\n"
        "        w = torch.where(causal_mask, w, mask_value)\n"
        "        w = nn.Softmax(dim=-1)(w)\n"
        "        out = torch.matmul(w, v)\n"
        "        return out, w\n",
        "class Attn(nn.Module):\n"
        "    def __init__(self, config, attention_type):\n"
        "        self.config = config\n        self.attention_type = attention_type\n"
        "        n = config.max_position_embeddings\n"
        "        bias = torch.tril(torch.ones((n, n), dtype=bool)).view(1, 1, n, n)\n"
        "        if attention_type == \"local\":\n"
        "            bias = torch.bitwise_xor(bias, torch.tril(bias, -config.window_size))\n"
        "        self.bias = nn.Buffer(bias, persistent=False)\n\n"
        "    def forward(self, q, k, v, attention_mask):\n"
        "        query_length, key_length = q.size(-2), k.size(-2)\n"
        "        out, w = attention_interface(self, q, k, v, None, scaling=1.0, "
        "sliding_window=self.config.window_size if self.attention_type == \"local\" else None)\n"
        "        return out, w\n",
    ),
    # BART-era (XGLM): shape checks that only raise go with the region, a clamp of the masked
    # scores at the lowest value changes nothing, and the weights returned are a reshape of the
    # probabilities; the query was scaled by hand before (PT029 folds it): scaling=1.0
    Example(
        "class Attn(nn.Module):\n"
        "    def forward(self, x, attention_mask):\n"
        "        q = self.q_proj(x) * self.scaling\n        k = self.k_proj(x)\n        v = self.v_proj(x)\n"
        "        n = k.size(1)\n"
        "        w = torch.bmm(q, k.transpose(1, 2))\n"
        "        if w.size() != (b, t, n):\n            raise ValueError(\"bad size\")\n"
        "        if attention_mask is not None:\n"
        "            if attention_mask.size() != (b, 1, t, n):\n                raise ValueError(\"bad mask\")\n"
        "            w = w.view(b, h, t, n) + attention_mask\n"
        "            w = torch.max(w, torch.full((), torch.finfo(w.dtype).min))\n"
        "            w = w.view(b * h, t, n)\n"
        "        w = nn.functional.softmax(w, dim=-1)\n"
        "        w_reshaped = w.view(b, h, t, n)\n        w = w_reshaped.view(b * h, t, n)\n"
        "        out = torch.bmm(w, v)\n"
        "        if out.size() != (b * h, t, d):\n            raise ValueError(\"bad output\")\n"
        "        out = out.view(b, h, t, d).transpose(1, 2)\n"
        "        return self.o_proj(out), w_reshaped\n",
        "class Attn(nn.Module):\n"
        "    def forward(self, x, attention_mask):\n"
        "        q = self.q_proj(x) * self.scaling\n        k = self.k_proj(x)\n        v = self.v_proj(x)\n"
        "        n = k.size(1)\n"
        "        out, w_reshaped = attention_interface(self, q, k, v, attention_mask, scaling=1.0)\n"
        "        return self.o_proj(out), w_reshaped\n",
    ),
    # OPT 4.x: heads flattened into the batch by a shape helper, the clamp spelled with
    # `torch.tensor`, and the weights HF returns bound to None (PT222 kept that arm)
    Example(
        "class Attn(nn.Module):\n"
        "    def _shape(self, t, n, b):\n        return t.view(b, n, self.h, self.d).transpose(1, 2).contiguous()\n\n"
        "    def forward(self, x, attention_mask):\n"
        "        q = self.q_proj(x) * self.scaling\n"
        "        k = self._shape(self.k_proj(x), -1, b)\n        v = self._shape(self.v_proj(x), -1, b)\n"
        "        proj_shape = (b * self.h, -1, self.d)\n"
        "        q = self._shape(q, t, b).view(*proj_shape)\n"
        "        k = k.view(*proj_shape)\n        v = v.view(*proj_shape)\n"
        "        n = k.size(1)\n"
        "        w = torch.bmm(q, k.transpose(1, 2))\n"
        "        if attention_mask is not None:\n"
        "            w = w.view(b, self.h, t, n) + attention_mask\n"
        "            w = torch.max(w, torch.tensor(torch.finfo(w.dtype).min, device=w.device))\n"
        "            w = w.view(b * self.h, t, n)\n"
        "        w = nn.functional.softmax(w, dim=-1)\n"
        "        w_reshaped = None\n"
        "        p = nn.functional.dropout(w, p=self.dropout, training=self.training)\n"
        "        out = torch.bmm(p, v)\n"
        "        out = out.view(b, self.h, t, self.d).transpose(1, 2).reshape(b, t, self.e)\n"
        "        return self.o_proj(out), w_reshaped\n",
        "class Attn(nn.Module):\n"
        "    def _shape(self, t, n, b):\n        return t.view(b, n, self.h, self.d).transpose(1, 2).contiguous()\n\n"
        "    def forward(self, x, attention_mask):\n"
        "        q = self.q_proj(x) * self.scaling\n"
        "        k = self._shape(self.k_proj(x), -1, b)\n        v = self._shape(self.v_proj(x), -1, b)\n"
        "        proj_shape = (b * self.h, -1, self.d)\n"
        "        q = self._shape(q, t, b).view(*proj_shape)\n"
        "        out, w_reshaped = attention_interface(self, q, k, v, attention_mask, scaling=1.0)\n"
        "        return self.o_proj(out), w_reshaped\n",
    ),
    # in a helper (Qwen-1's `_attn`): the sizes only the mask read go dead; the caller gets the call
    Example(
        "class Attn(nn.Module):\n"
        "    def __init__(self, config):\n        n = config.max_position_embeddings\n"
        "        self.bias = nn.Buffer(torch.tril(torch.ones((n, n), dtype=torch.bool)).view(1, 1, n, n), persistent=False)\n\n"
        "    def _attn(self, q, k, v, attention_mask=None):\n"
        "        w = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(v.size(-1))\n"
        "        query_length, key_length = q.size(-2), k.size(-2)\n"
        "        causal_mask = self.bias[:, :, key_length - query_length : key_length, :key_length]\n"
        "        w = torch.where(causal_mask, w, torch.finfo(w.dtype).min)\n"
        "        if attention_mask is not None:\n            w = w + attention_mask\n"
        "        w = F.softmax(w.float(), dim=-1).type(v.dtype)\n"
        "        out = torch.matmul(w, v)\n        return out, w\n\n"
        "    def forward(self, q, k, v, attention_mask):\n        out, _ = self._attn(q, k, v, attention_mask)\n"
        "        return out\n",
        "class Attn(nn.Module):\n"
        "    def __init__(self, config):\n        n = config.max_position_embeddings\n"
        "        self.bias = nn.Buffer(torch.tril(torch.ones((n, n), dtype=torch.bool)).view(1, 1, n, n), persistent=False)\n\n"
        "    def forward(self, q, k, v, attention_mask):\n        out, _ = attention_interface("
        "self, q, k, v, attention_mask, scaling=1 / math.sqrt(v.size(-1)))\n        return out\n",
    ),
    # OpenAI GPT: a causal buffer blended in (`w * b + -1e4 * (1 - b)`), a scale under a flag, and a
    # helper returning its output in a list: the caller gets the call and the list on one line
    Example(
        "class Attn(nn.Module):\n"
        "    def __init__(self, n, scale=False):\n"
        "        self.bias = nn.Buffer(torch.tril(torch.ones(n, n)).view(1, 1, n, n), persistent=False)\n"
        "        self.scale = scale\n\n"
        "    def _attn(self, q, k, v, attention_mask=None, output_attentions=False):\n"
        "        w = torch.matmul(q, k)\n"
        "        if self.scale:\n            w = w / math.sqrt(v.size(-1))\n"
        "        b = self.bias[:, :, : w.size(-2), : w.size(-1)]\n"
        "        w = w * b + -1e4 * (1 - b)\n"
        "        if attention_mask is not None:\n            w = w + attention_mask\n"
        "        w = nn.functional.softmax(w, dim=-1)\n"
        "        outputs = [torch.matmul(w, v)]\n"
        "        if output_attentions:\n            outputs.append(w)\n"
        "        return outputs\n\n"
        "    def forward(self, q, k, v, attention_mask):\n"
        "        attn_outputs = self._attn(q, k, v, attention_mask)\n"
        "        return attn_outputs[0]\n",
        "class Attn(nn.Module):\n"
        "    def __init__(self, n, scale=False):\n"
        "        self.bias = nn.Buffer(torch.tril(torch.ones(n, n)).view(1, 1, n, n), persistent=False)\n"
        "        self.scale = scale\n\n"
        "    def forward(self, q, k, v, attention_mask):\n"
        "        attn_output, _ = attention_interface(self, q, k, v, attention_mask, "
        "scaling=(1 / math.sqrt(v.size(-1)) if self.scale else 1.0)); attn_outputs = [attn_output]\n"
        "        return attn_outputs[0]\n",
    ),
    # GPT-NeoX-Japanese: the scores are `torch.baddbmm` (positional) over a zeros buffer, so only the product
    # scaled by alpha is left (beta * zeros adds nothing); its `_attn` is defined below the forward calling it
    Example(
        "class Attn(nn.Module):\n"
        "    def forward(self, x, attention_mask):\n"
        "        q, k, v = self._split(self.qkv(x))\n"
        "        out, w = self._attn(q, k, v, attention_mask)\n"
        "        return self.dense(self._merge_heads(out)), w\n\n"
        "    def _merge_heads(self, t):\n        return t.permute(0, 2, 1, 3).flatten(2)\n\n"
        "    def _attn(self, q, k, v, attention_mask=None):\n"
        "        b, h, n, d = q.size()\n"
        "        m = k.size(-2)\n"
        "        q = q.view(b * h, n, d)\n        k = k.view(b * h, m, d)\n"
        "        s = torch.zeros(b * h, n, m, dtype=q.dtype, device=k.device)\n"
        "        w = torch.baddbmm(s, q, k.transpose(1, 2), beta=1.0, alpha=1.0 / self.norm_factor)\n"
        "        w = w.view(b, h, n, -1)\n"
        "        if attention_mask is not None:\n            w = w + attention_mask\n"
        "        w = nn.functional.softmax(w, dim=-1)\n"
        "        w = w.to(v.dtype)\n"
        "        out = torch.matmul(w, v)\n"
        "        return out, w\n",
        "class Attn(nn.Module):\n"
        "    def forward(self, x, attention_mask):\n"
        "        q, k, v = self._split(self.qkv(x))\n"
        "        out, w = attention_interface(self, q, k, v, attention_mask, scaling=1.0 / self.norm_factor)\n"
        "        return self.dense(self._merge_heads(out)), w\n\n"
        "    def _merge_heads(self, t):\n        return t.permute(0, 2, 1, 3).flatten(2)\n",
    ),
    # must leave unchanged: a baddbmm whose input is not zeros adds something no engine call computes
    Example(_UNCHANGED_BADDBMM, _UNCHANGED_BADDBMM),
    # a cache step's arm keeping the mask's last query row (Baichuan2-13B): it only fits the mask to
    # the one query, which the engine masks itself; the floor at finfo.min changes no seen score
    Example(
        "class Attn(nn.Module):\n"
        "    def forward(self, x, attention_mask):\n"
        "        q, k, v = self.split(self.W_pack(x))\n"
        "        w = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)\n"
        "        if attention_mask is not None:\n"
        "            if q_len == 1:\n"
        "                if len(attention_mask.size()) == 4:\n"
        "                    attention_mask = attention_mask[:, :, -1:, :]\n"
        "                else:\n"
        "                    attention_mask = attention_mask[:, -1:, :]\n"
        "            w = w + attention_mask\n"
        "            w = torch.max(w, torch.tensor(torch.finfo(w.dtype).min))\n"
        "        w = torch.nn.functional.softmax(w, dim=-1)\n"
        "        out = torch.matmul(w, v)\n"
        "        return self.o_proj(out.transpose(1, 2)), w\n",
        "class Attn(nn.Module):\n"
        "    def forward(self, x, attention_mask):\n"
        "        q, k, v = self.split(self.W_pack(x))\n"
        "        out, w = attention_interface(self, q, k, v, attention_mask, scaling=1 / math.sqrt(self.head_dim))\n"
        "        return self.o_proj(out.transpose(1, 2)), w\n",
    ),
    # must leave unchanged: the arm slices the mask's keys (the last column), not its query rows
    Example(_UNCHANGED_KEY_SLICE, _UNCHANGED_KEY_SLICE),
    # must leave unchanged: a buffer that is no causal triangle blended into the scores
    Example(_UNCHANGED_BLEND, _UNCHANGED_BLEND),
    # must leave unchanged: `torch.where` masks the scores with a tensor that is no causal buffer
    # of the class (what it lets through is unknown, so no engine mask reproduces it)
    Example(_UNCHANGED_WHERE, _UNCHANGED_WHERE),
]
