"""PT023 fuse-qkv: the rule `FuseQkv`; its `why` says what it rewrites and why."""

from __future__ import annotations

import dataclasses

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, findall, names_in, self_call_attr
from porter.analysis.qkv_layout import FusedLayout, fused_layout
from porter.passes._edit import is_assign_of
from porter.passes.base import Example, Rule
from porter.analysis.cstutil import dotted
from porter.analysis.layout_interp import bound_in
from porter.analysis.layouts import (
    attention_call_names, linear_args, packed_split_call, per_head_split_helper, thirds_to_front,
)

_UNCHANGED_PT023 = (
    'from torch import nn\n'
    '\n'
    '\n'
    'class Mixer(nn.Module):\n'
    '    def __init__(self, config):\n'
    '        super().__init__()\n'
    '        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)\n'
    '        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)\n'
    '        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)\n'
    '\n'
    '    def forward(self, x):\n'
    '        return self.q_proj(x) * self.k_proj(x).sigmoid() + self.v_proj(x)\n'
)


class FuseQkv(Rule):
    descend_methods = frozenset()
    code = "PT023"
    name = "fuse-qkv"
    why = (
        "vLLM shards attention by heads with one fused `QKVParallelLinear` (`qkv_proj`), so each "
        "rank holds whole heads of q, k and v and loads the three checkpoint tensors as shards "
        "'q', 'k', 'v'. The three projections are found by dataflow (what feeds the attention "
        "call), not by name. In forward, one `qkv_proj` call and a split by per-rank sizes "
        "replace the three calls. A projection packed per head in the checkpoint (GPT-NeoX's "
        "`chunk(3)`, or a `_split_heads` helper viewing `(..., heads, 3, head_dim)`) is loaded "
        "into [q; k; v] order by load_weights, and the helper goes. So is one grouped per KV head "
        "(`[kv_heads, q_per_kv + 2, head_dim]`: q slots, then one k and one v) in every config arm, "
        "read from what forward computes on index arrays, however it is spelled (Falcon's three "
        "layouts, in a helper or inline: porter/analysis/qkv_layout.py); the statements computing "
        "the split go; its KV heads are read from the projection's width (H + 2 * KV heads of head_dim). So is one "
        "found flat [q; k; v] that way but split otherwise than by slices or sizes (ergo: viewed to heads, split "
        "by head counts): the engine's packing, no regrouping. So is one in blocks "
        "(CodeGen's `mp_num`: each block one slice of q, v and k, porter/analysis/blocked_qkv.py)."
    )
    examples = [
        Example(  # the projection's output named first, then split into three equal widths (Qwen-1's c_attn)
            "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.hidden_size = config.hidden_size\n        self.head_dim = config.head_dim\n"
            "        self.c_attn = nn.Linear(config.hidden_size, 3 * self.hidden_size)\n\n"
            "    def forward(self, x):\n        mixed = self.c_attn(x)\n"
            "        q, k, v = mixed.split(self.hidden_size, dim=2)\n"
            "        out, _ = attention_interface(self, q, k, v, None, scaling=1.0)\n        return out\n",
            "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.hidden_size = config.hidden_size\n        self.head_dim = config.head_dim\n"
            "        self.c_attn = QKVParallelLinear(config.hidden_size, self.head_dim, self.hidden_size // self.head_dim, "
            "self.hidden_size // self.head_dim, bias=True, quant_config=quant_config, prefix=f\"{prefix}.c_attn\")\n"
            "        self.q_size = self.c_attn.num_heads * self.head_dim\n"
            "        self.kv_size = self.c_attn.num_kv_heads * self.head_dim\n\n"
            "    def forward(self, x):\n        mixed, _ = self.c_attn(x)\n"
            "        q, k, v = mixed.split([self.q_size, self.kv_size, self.kv_size], dim=-1)\n"
            "        out, _ = attention_interface(self, q, k, v, None, scaling=1.0)\n        return out\n",
        ),
        Example(
            "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.head_dim = config.head_dim\n"
            "        self.q_proj = nn.Linear(config.hidden_size, "
            "config.num_heads * self.head_dim)\n"
            "        self.k_proj = nn.Linear(config.hidden_size, "
            "config.num_kv_heads * self.head_dim)\n"
            "        self.v_proj = nn.Linear(config.hidden_size, "
            "config.num_kv_heads * self.head_dim)\n\n    def forward(self, x):\n"
            "        q = self.q_proj(x)\n        k = self.k_proj(x)\n        v = self.v_proj(x)\n"
            "        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)\n"
            "        return out\n",
            "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.head_dim = config.head_dim\n"
            "        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, "
            "config.num_heads, config.num_kv_heads, bias=True, quant_config=quant_config, "
            'prefix=f"{prefix}.qkv_proj")\n'
            "        self.q_size = self.qkv_proj.num_heads * self.head_dim\n"
            "        self.kv_size = self.qkv_proj.num_kv_heads * self.head_dim\n\n"
            "    def forward(self, x):\n        qkv, _ = self.qkv_proj(x)\n"
            "        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)\n"
            "        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)\n"
            "        return out\n",
        ),
        Example(
            "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.head_dim = config.head_dim\n"
            "        self.q_proj = nn.Linear(config.hidden_size, "
            "config.num_heads * self.head_dim)\n"
            "        self.k_proj = nn.Linear(config.hidden_size, "
            "config.num_kv_heads * self.head_dim)\n"
            "        self.v_proj = nn.Linear(config.hidden_size, "
            "config.num_kv_heads * self.head_dim)\n\n    def forward(self, x):\n"
            "        out, _ = attention_interface(self, self.q_proj(x), self.k_proj(x), "
            "self.v_proj(x), None, scaling=1.0)\n        return out\n",
            "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.head_dim = config.head_dim\n"
            "        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, "
            "config.num_heads, config.num_kv_heads, bias=True, quant_config=quant_config, "
            'prefix=f"{prefix}.qkv_proj")\n'
            "        self.q_size = self.qkv_proj.num_heads * self.head_dim\n"
            "        self.kv_size = self.qkv_proj.num_kv_heads * self.head_dim\n\n"
            "    def forward(self, x):\n        qkv, _ = self.qkv_proj(x)\n"
            "        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)\n"
            "        out, _ = attention_interface(self, q, k, v, None, scaling=1.0)\n"
            "        return out\n",
        ),
        Example(
            'from torch import nn\n'
            '\n'
            '\n'
            'class Attn(nn.Module):\n'
            '    def __init__(self, config):\n'
            '        super().__init__()\n'
            '        self.head_dim = config.head_dim\n'
            '        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)\n'
            '        self.q_norm = nn.LayerNorm(self.head_dim)\n'
            '\n'
            '    def _split_heads(self, x):\n'
            '        x = x.view(*x.shape[:-1], -1, 3, self.head_dim)\n'
            '        return x[..., 0, :], x[..., 1, :], x[..., 2, :]\n'
            '\n'
            '    def forward(self, x):\n'
            '        fused = self.qkv(x)\n'
            '        q, k, v = self._split_heads(fused)\n'
            '        q = self.q_norm(q)\n'
            '        out, _ = attention_interface(self, q, k, v, None)\n'
            '        return out\n',
            'from torch import nn\n'
            '\n'
            '\n'
            'class Attn(nn.Module):\n'
            '    def __init__(self, config):\n'
            '        super().__init__()\n'
            '        self.head_dim = config.head_dim\n'
            '        self.qkv = QKVParallelLinear(config.hidden_size, self.head_dim, config.hidden_size // self.head_dim, config.hidden_size // self.head_dim, bias=True, quant_config=quant_config, prefix=f"{prefix}.qkv")\n'
            '        self.q_size = self.qkv.num_heads * self.head_dim\n'
            '        self.kv_size = self.qkv.num_kv_heads * self.head_dim\n'
            '        self.q_norm = nn.LayerNorm(self.head_dim)\n'
            '\n'
            '    def forward(self, x):\n'
            '        fused, _ = self.qkv(x)\n'
            '        q, k, v = fused.split([self.q_size, self.kv_size, self.kv_size], dim=-1)\n'
            '        q = self.q_norm(q)\n'
            '        out, _ = attention_interface(self, q, k, v, None)\n'
            '        return out\n',
        ),
        Example(  # in mp_num blocks of [q, v, k] slices (CodeGen): regrouped when loading, split in q, k, v order
            'from torch import nn\n'
            '\n'
            '\n'
            'class Attn(nn.Module):\n'
            '    def __init__(self, config):\n'
            '        super().__init__()\n'
            '        self.head_dim = config.head_dim\n'
            '        self.qkv = nn.Linear(config.hidden_size, config.hidden_size * 3, bias=False)\n'
            '\n'
            '    def forward(self, x):\n'
            '        qkv = self.qkv(x)\n'
            '        mp_num = 4\n'
            '        qkv_split = qkv.reshape(qkv.shape[:-1] + (mp_num, -1))\n'
            '        q, v, k = torch.split(qkv_split, config.hidden_size // mp_num, dim=-1)\n'
            '        out, _ = attention_interface(self, q, k, v, None)\n'
            '        return out\n',
            'from torch import nn\n'
            '\n'
            '\n'
            'class Attn(nn.Module):\n'
            '    def __init__(self, config):\n'
            '        super().__init__()\n'
            '        self.head_dim = config.head_dim\n'
            '        self.qkv = QKVParallelLinear(config.hidden_size, self.head_dim, config.hidden_size // self.head_dim, config.hidden_size // self.head_dim, bias=False, quant_config=quant_config, prefix=f"{prefix}.qkv")\n'
            '        self.q_size = self.qkv.num_heads * self.head_dim\n'
            '        self.kv_size = self.qkv.num_kv_heads * self.head_dim\n'
            '\n'
            '    def forward(self, x):\n'
            '        qkv, _ = self.qkv(x)\n'
            '        mp_num = 4\n'
            '        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)\n'
            '        out, _ = attention_interface(self, q, k, v, None)\n'
            '        return out\n',
        ),
        Example(  # grouped per KV head in every config arm, as forward computes it (Falcon): regrouped when loading
            'from torch import nn\n'
            '\n'
            '\n'
            'class Attn(nn.Module):\n'
            '    def __init__(self, config):\n'
            '        super().__init__()\n'
            '        self.num_heads = config.num_heads\n'
            '        self.head_dim = config.head_dim\n'
            '        self.num_kv_heads = config.num_kv_heads if config.grouped else 1\n'
            '        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim\n'
            '        self.qkv = nn.Linear(config.hidden_size, qkv_out)\n'
            '        self.grouped = config.grouped\n'
            '\n'
            '    def forward(self, x):\n'
            '        fused = self.qkv(x).view(*x.shape[:-1], -1, self.head_dim)\n'
            '        if self.grouped:\n'
            '            g = fused.view(*x.shape[:-1], self.num_kv_heads, -1, self.head_dim)\n'
            '            q = g[..., :-2, :].flatten(-3, -2)\n'
            '            k, v = g[..., -2, :], g[..., -1, :]\n'
            '        else:\n'
            '            q, k, v = fused.split([self.num_heads, 1, 1], dim=-2)\n'
            '        out, _ = attention_interface(self, q, k, v, None)\n'
            '        return out\n',
            'from torch import nn\n'
            '\n'
            '\n'
            'class Attn(nn.Module):\n'
            '    def __init__(self, config):\n'
            '        super().__init__()\n'
            '        self.num_heads = config.num_heads\n'
            '        self.head_dim = config.head_dim\n'
            '        self.num_kv_heads = config.num_kv_heads if config.grouped else 1\n'
            '        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim\n'
            '        self.qkv = QKVParallelLinear(config.hidden_size, self.head_dim, self.num_heads, (qkv_out // self.head_dim - self.num_heads) // 2, bias=True, quant_config=quant_config, prefix=f"{prefix}.qkv")\n'
            '        self.q_size = self.qkv.num_heads * self.head_dim\n'
            '        self.kv_size = self.qkv.num_kv_heads * self.head_dim\n'
            '        self.grouped = config.grouped\n'
            '\n'
            '    def forward(self, x):\n'
            '        fused, _ = self.qkv(x)\n'
            '        q, k, v = fused.split([self.q_size, self.kv_size, self.kv_size], dim=-1)\n'
            '        out, _ = attention_interface(self, q, k, v, None)\n'
            '        return out\n',
        ),
        Example(  # flat [q; k; v] viewed to heads and split by head counts (ergo): the split by sizes
            "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.config = config\n        self.head_dim = config.head_dim\n"
            "        self.qkv = nn.Linear(config.hidden_size, (config.num_heads + 2 * config.num_kv_heads) * self.head_dim)\n\n"
            "    def forward(self, x):\n        input_shape = x.shape[:-1]\n"
            "        fused = self.qkv(x).view(*input_shape, -1, self.head_dim)\n"
            "        kv = self.config.num_kv_heads\n"
            "        q, k, v = fused.split((self.config.num_heads, kv, kv), dim=-2)\n"
            "        out, _ = attention_interface(self, q, k, v, None)\n        return out\n",
            "from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.config = config\n        self.head_dim = config.head_dim\n"
            "        self.qkv = QKVParallelLinear(config.hidden_size, self.head_dim, self.config.num_heads, "
            "(((config.num_heads + 2 * config.num_kv_heads) * self.head_dim) // self.head_dim - self.config.num_heads) // 2, "
            'bias=True, quant_config=quant_config, prefix=f"{prefix}.qkv")\n'
            "        self.q_size = self.qkv.num_heads * self.head_dim\n"
            "        self.kv_size = self.qkv.num_kv_heads * self.head_dim\n\n"
            "    def forward(self, x):\n        input_shape = x.shape[:-1]\n"
            "        fused, _ = self.qkv(x)\n"
            "        kv = self.config.num_kv_heads\n"
            "        q, k, v = fused.split([self.q_size, self.kv_size, self.kv_size], dim=-1)\n"
            "        out, _ = attention_interface(self, q, k, v, None)\n        return out\n",
        ),
        Example(  # interleaved per head, q, k and v sliced from the heads one statement each (GPT-NeoX-Japanese)
            'from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n        self.num_heads = config.num_heads\n        self.head_size = config.hidden_size // config.num_heads\n        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)\n\n    def forward(self, x):\n        qkv = self.qkv(x)\n        qkv = qkv.view(*qkv.size()[:-1], self.num_heads, 3 * self.head_size)\n        q = qkv[..., : self.head_size].permute(0, 2, 1, 3)\n        k = qkv[..., self.head_size : 2 * self.head_size].permute(0, 2, 1, 3)\n        v = qkv[..., 2 * self.head_size :].permute(0, 2, 1, 3)\n        out, _ = attention_interface(self, q, k, v, None)\n        return out\n',
            'from torch import nn\n\n\nclass Attn(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n        self.num_heads = config.num_heads\n        self.head_size = config.hidden_size // config.num_heads\n        self.qkv = QKVParallelLinear(config.hidden_size, self.head_size, self.num_heads, ((3 * config.hidden_size) // self.head_size - self.num_heads) // 2, bias=False, quant_config=quant_config, prefix=f"{prefix}.qkv")\n        self.q_size = self.qkv.num_heads * self.head_size\n        self.kv_size = self.qkv.num_kv_heads * self.head_size\n\n    def forward(self, x):\n        qkv, _ = self.qkv(x)\n        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)\n        out, _ = attention_interface(self, q, k, v, None)\n        return out\n',
        ),
        # must leave unchanged: projections named q/k/v that do not feed an attention call
        # are not fused (roles come from dataflow, not names)
        Example(_UNCHANGED_PT023, _UNCHANGED_PT023),
    ]

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        attn = self.plan.attention(cls or "")
        if not attn or len(self.scope) != 1:
            return updated
        if updated.name.value == "__init__":
            return self._init(attn, updated)
        if attn.packed and updated.name.value == self._split_helper(attn):
            return cst.RemoveFromParent()  # the per-head split it did is load_weights' permutation now
        if updated.name.value == "forward":
            return self._forward_packed(attn, updated) if attn.packed else self._forward(attn, updated)
        return updated

    def _split_helper(self, attn) -> str | None:
        """The method splitting the packed output into heads: per head `(heads, 3, head_dim)`, or
        grouped per KV head in every config arm (Falcon): its layout is load_weights' job."""
        info = self.ctx.idx.classes[attn.cls]
        if attn.grouped:
            layout = self._layout(attn)
            return layout.helpers[0] if layout and layout.helpers else None
        return per_head_split_helper(info, attn.q)

    def _layout(self, attn) -> FusedLayout | None:
        """The grouped layout of the packed projection, as forward computes it (porter/analysis/qkv_layout.py)."""
        info = self.ctx.idx.classes[attn.cls]
        fwd = info.method("forward")
        names = attention_call_names(self.ctx.idx)
        calls = [c for c in findall(fwd, m.Call()) if dotted(c.func) in names] if fwd else []  # type: ignore[attr-defined]
        if not calls:
            return None
        in_f, out_f, _ = linear_args(info.submodules[attn.q].call)
        return fused_layout(info, attn.q, calls[0], attn.head_dim, (in_f, out_f))  # type: ignore[arg-type]

    def _forward_packed(self, attn, fn: cst.FunctionDef) -> cst.FunctionDef:
        """`qkv = self.qkv_proj(x); q = qkv[..., :Q]; k = ...; v = ...` -> one split by per-rank sizes."""
        if attn.grouped:
            return self._forward_grouped(attn, fn)
        out_name, names, body, placed = None, [], [], False
        blocked_view: str | None = None
        split_helper = self._split_helper(attn)
        stmts: list[cst.BaseStatement] = []
        for st in fn.body.body:
            if attn.interleaved_unless and m.matches(st, m.If(test=m.Attribute(
                    value=m.Name("self"), attr=m.Name(attn.interleaved_unless)))):
                # both arms split the same projection; the per-head arm's layout is load_weights' job
                stmts.extend(st.body.body)  # type: ignore[attr-defined]
                continue
            stmts.append(st)
        for st in stmts:
            split_call = packed_split_call(st, attn.q)
            if split_call is not None:
                x = findall(split_call, m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(attn.q))))[0]
                names = [e.value.value for e in st.body[0].targets[0].target.elements]  # type: ignore[attr-defined]
                body.append(cst.SimpleStatementLine([cst.Assign(
                    targets=[cst.AssignTarget(cst.parse_expression("qkv, _"))], value=x)]))
                body.append(cst.parse_statement(
                    f"{names[0]}, {names[1]}, {names[2]} = qkv.split("
                    "[self.q_size, self.kv_size, self.kv_size], dim=-1)\n"))
                placed = True
                continue
            if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())], value=m.Call(
                    func=m.Attribute(value=m.Name("self"), attr=m.Name(attn.q))))])):
                out_name = st.body[0].targets[0].target.value  # type: ignore[attr-defined]
                # engine linears return (output, bias)
                body.append(st.with_changes(body=[st.body[0].with_changes(targets=[cst.AssignTarget(  # type: ignore[attr-defined]
                    cst.parse_expression(f"{out_name}, _"))])]))
                continue
            if out_name and not attn.blocked and m.matches(st, m.SimpleStatementLine(body=[m.Assign(
                    targets=[m.AssignTarget(m.Tuple())], value=m.Call(func=m.Attribute(
                        value=m.Name(out_name), attr=m.Name("chunk") | m.Name("split"))) | m.Call(func=m.Attribute(
                            value=m.Name("self"), attr=m.Name(split_helper or "")),
                            args=[m.Arg(m.Name(out_name))]))])):
                # per-head interleaved (loaded into q/k/v order by load_weights): split by sizes
                names = [e.value.value for e in st.body[0].targets[0].target.elements]  # type: ignore[attr-defined]
                body.append(cst.parse_statement(
                    f"{names[0]}, {names[1]}, {names[2]} = {out_name}.split("
                    "[self.q_size, self.kv_size, self.kv_size], dim=-1)\n"))
                placed = True
                continue
            if out_name and m.matches(st, m.SimpleStatementLine(body=[m.Assign(
                    targets=[m.AssignTarget(m.Name(out_name))])])) and thirds_to_front(st.body[0].value, out_name):  # type: ignore[attr-defined]
                # `out = out.unflatten(-1, (3, H))...`, thirds to the front: `out[0]`, `out[1]`,
                # `out[2]` (below) are q, k and v, as the split by sizes makes them
                continue
            if out_name and attn.blocked and (done := self._blocked(attn, st, out_name, blocked_view)) is not None:
                if isinstance(done, str):
                    blocked_view = done  # the blocked view goes: load_weights regroups the blocks
                else:
                    body.append(done)
                    placed = True
                continue
            if out_name and m.matches(st, m.SimpleStatementLine(body=[m.Assign(
                    targets=[m.AssignTarget(m.Name())], value=m.Subscript(value=m.Name(out_name)))])):
                names.append(st.body[0].targets[0].target.value)  # type: ignore[attr-defined]
                if len(names) == 3 and not placed:
                    body.append(cst.parse_statement(
                        f"{names[0]}, {names[1]}, {names[2]} = {out_name}.split("
                        "[self.q_size, self.kv_size, self.kv_size], dim=-1)\n"))
                    placed = True
                continue
            body.append(st)
        if not placed and (layout := self._layout(attn)) is not None and layout.kind == "flat":
            # [q; k; v] as the engine packs it, split some other way (a view to heads split by
            # head counts): the statements computing the split go, as for a grouped layout
            return self._forward_grouped(attn, fn)
        if not placed:
            raise self.ctx.idx.error("cannot port attention: packed q/k/v slices not found in forward",
                                     construct=f"{attn.cls}.forward", rule=self.name)
        self.mark(f"{attn.cls}.forward")
        return fn.with_changes(body=fn.body.with_changes(body=body))

    def _forward_grouped(self, attn, fn: cst.FunctionDef) -> cst.FunctionDef:
        """The statements that compute the grouped split (porter/analysis/qkv_layout.py: from the
        one binding the projection's output to the one binding q, k and v) -> the projection call
        and one split of its [q; k; v] output (load_weights regroups the checkpoint) by per-rank sizes."""
        body = list(fn.body.body)  # type: ignore[attr-defined]
        layout = self._aligned(attn, self._layout(attn), body)
        proj = m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(attn.q)))
        ok = layout is not None and layout.out_name is not None and layout.last < len(body) and m.matches(
            body[layout.first], m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name(layout.out_name))])]))
        if not ok or not findall(body[layout.first], proj) or not self._split_in_chain(body, layout):  # type: ignore[arg-type]
            raise self.ctx.idx.error("cannot port attention: the grouped q/k/v split is not where forward computed it",
                                     construct=f"{attn.cls}.forward", rule=self.name)
        assert layout is not None
        first = body[layout.first]
        call = findall(first, proj)[0]
        out = layout.out_name
        split = cst.parse_statement(f"{', '.join(layout.names)} = {out}.split([self.q_size, self.kv_size, self.kv_size], dim=-1)\n")
        new: list[cst.BaseStatement] = []
        for i, st in enumerate(body):
            if i == layout.first:  # engine linears return (output, bias)
                new.append(first.with_changes(body=[first.body[0].with_changes(  # type: ignore[attr-defined]
                    targets=[cst.AssignTarget(cst.parse_expression(f"{out}, _"))], value=call)]))
            if i == layout.last:
                new.append(split)
            elif i not in layout.chain:
                new.append(st)
        self.mark(f"{attn.cls}.forward")
        return fn.with_changes(body=fn.body.with_changes(body=new))

    def _aligned(self, attn, layout: FusedLayout | None, body: list[cst.BaseStatement]) -> FusedLayout | None:
        """The layout's statement numbers are the source forward's; a rule before this one may have
        dropped a statement above them (a check that only warns): they move with the statement
        binding the projection's output, found by its code."""
        fwd = self.ctx.idx.classes[attn.cls].method("forward")
        if layout is None or fwd is None or layout.first >= len(fwd.body.body):  # type: ignore[attr-defined]
            return layout

        def text(st: cst.CSTNode) -> str:
            return code(st.with_changes(leading_lines=())).strip()  # type: ignore[attr-defined]

        want = text(fwd.body.body[layout.first])  # type: ignore[attr-defined]
        hits = [i for i, st in enumerate(body) if text(st) == want]
        if len(hits) != 1 or hits[0] == layout.first:
            return layout
        d = hits[0] - layout.first
        return dataclasses.replace(layout, first=layout.first + d, last=layout.last + d,
                                   chain=tuple(c + d for c in layout.chain))

    @staticmethod
    def _split_in_chain(body: list[cst.BaseStatement], layout: FusedLayout) -> bool:
        """q, k and v are bound by the chain's statements (all by its last, or one each: GPT-NeoX-Japanese's
        three slices), and no statement between its first and last that stays reads what a chain statement
        after the first bound (the split, put at the last, binds it only there)."""
        bound: set[str] = set()
        for i in range(layout.first + 1, layout.last + 1):
            if i in layout.chain:
                bound |= bound_in(body[i])
            elif names_in(body[i]) & bound:
                return False
        return set(layout.names) <= bound

    @staticmethod
    def _blocked(attn, st: cst.BaseStatement, out_name: str, view: str | None) -> str | cst.BaseStatement | None:
        """CodeGen's blocks (`attn.blocked`): `view = qkv.reshape(qkv.shape[:-1] + (mp_num, -1))` (`view =
        qkv` once PT022 flattened the heads) -> its name (the statement goes); `query, value, key =
        torch.split(view, local_dim, dim=-1)` (`qkv.split(local_dim, dim=-1)`, transformers 5.24) -> one
        split of the (regrouped) projection by per-rank sizes, in q, k, v order."""
        if not m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget()])])):
            return None
        a = st.body[0]  # type: ignore[attr-defined]
        if view is None and isinstance(a.targets[0].target, cst.Name) and m.matches(a.value, m.Call(
                func=m.Attribute(value=m.Name(out_name), attr=m.Name("reshape") | m.Name("view"))) | m.Name(out_name)):
            return a.targets[0].target.value
        viewed = m.Name(view or out_name) | m.Name(out_name)
        if isinstance(a.targets[0].target, cst.Tuple) and m.matches(a.value, m.Call(
                func=m.Attribute(value=m.Name("torch"), attr=m.Name("split")), args=[m.Arg(viewed), m.ZeroOrMore()])
                | m.Call(func=m.Attribute(value=viewed, attr=m.Name("split")))):
            names = [code(e.value) for e in a.targets[0].target.elements]
            q, k, v = (names[i] for i in attn.blocked[1:])
            return cst.parse_statement(f"{q}, {k}, {v} = {out_name}.split([self.q_size, self.kv_size, self.kv_size], dim=-1)\n")
        return None

    def _init(self, attn, fn: cst.FunctionDef) -> cst.FunctionDef:
        body, done = [], False
        for st in fn.body.body:
            if any(is_assign_of(st, a) for a in (attn.q, attn.k, attn.v)):
                if not done:
                    name = attn.q if attn.packed else "qkv_proj"
                    body += [
                        cst.parse_statement(
                            f"self.{name} = {self.ctx.use('QKVParallelLinear')}({attn.hidden_size}, "
                            f"{attn.head_dim}, {attn.num_heads}, {attn.num_kv_heads}, bias={attn.bias}, "
                            f"quant_config=quant_config, prefix=f\"{{prefix}}.{name}\")\n"
                        ),
                        cst.parse_statement(f"self.q_size = self.{name}.num_heads * {attn.head_dim}\n"),
                        cst.parse_statement(f"self.kv_size = self.{name}.num_kv_heads * {attn.head_dim}\n"),
                    ]
                    done = True
                continue
            body.append(st)
        self.mark(f"{attn.cls}.__init__")
        return fn.with_changes(body=fn.body.with_changes(body=body))

    def _one_input(self, attn, fn: cst.FunctionDef) -> None:
        """One fused projection reads one input: q, k and v must project the same tensor. Different
        parameters of forward (CTRL's `forward(self, v, k, q)`) are the same tensor when every caller
        passes the same expression for them (`self.multi_head_attention(normed, normed, normed)`)."""
        bound = [(a.targets[0].target.value, a.value.value) for a in findall(fn, m.Assign(  # type: ignore[attr-defined]
            targets=[m.AssignTarget(m.Name())], value=m.Name()))]
        alias = {t: v for t, v in bound if [x for x, _ in bound].count(t) == 1}  # `current_states = hidden_states`
        inputs = {a: [alias.get(x, x) for c in findall(fn, m.Call()) if self_call_attr(c) == a and c.args
                      for x in [code(c.args[0].value)]]  # type: ignore[attr-defined]
                  for a in (attn.q, attn.k, attn.v)}
        if len({x for xs in inputs.values() for x in xs}) <= 1:
            return
        params = [p.name.value for p in fn.params.params][1:]
        names = [xs[0] for xs in inputs.values() if len(xs) == 1]
        callers = [c for info in self.ctx.idx.classes.values() for sub, s in info.submodules.items() if s.ctor == attn.cls
                   for c in findall(info.node, m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(sub))))]
        if len(names) == 3 and set(names) <= set(params) and callers:
            def passed(call: cst.Call, name: str) -> str | None:
                kw = {a.keyword.value: code(a.value) for a in call.args if a.keyword is not None}
                pos = [code(a.value) for a in call.args if a.keyword is None and not a.star]
                i = params.index(name)
                return pos[i] if i < len(pos) else kw.get(name)
            if all(len({passed(c, n) for n in names}) == 1 and passed(c, names[0]) for c in callers):  # type: ignore[arg-type]
                return
        raise self.ctx.idx.error("q, k and v projected from different inputs: one fused qkv projection reads one",
                                 fn, construct=f"{attn.cls}.forward", rule=self.name)

    def _forward(self, attn, fn: cst.FunctionDef) -> cst.FunctionDef:
        names = {attn.q: "q", attn.k: "k", attn.v: "v"}
        body = list(fn.body.body)
        first = None
        x_src = None
        for i, st in enumerate(body):
            calls = [c for c in findall(st, m.Call()) if self_call_attr(c) in names]
            if calls and first is None:
                first = i
                x_src = calls[0].args[0].value  # type: ignore[attr-defined]
        if first is None:
            raise self.ctx.idx.error("cannot port attention: q/k/v calls not found in forward",
                                     construct=f"{attn.cls}.forward", rule=self.name)
        self._one_input(attn, fn)
        # `query_states = self.q_proj(x)` (after flatten-heads) binds the split target directly
        targets = dict(names)
        keep: list[tuple[int, cst.BaseStatement]] = []
        for i, st in enumerate(body):
            if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())], value=m.Call())])):
                call = st.body[0].value  # type: ignore[attr-defined]
                attr = self_call_attr(call)
                if attr in names and len(call.args) == 1:
                    targets[attr] = st.body[0].targets[0].target.value  # type: ignore[attr-defined]
                    continue
            keep.append((i, st))

        class _Replace(cst.CSTTransformer):
            def leave_Call(self, original, updated):
                attr = self_call_attr(updated)
                if attr in names:
                    return cst.Name(targets[attr])
                return updated

        qkv_stmt = cst.SimpleStatementLine([cst.Assign(
            targets=[cst.AssignTarget(cst.parse_expression("qkv, _"))],
            value=cst.Call(func=cst.parse_expression("self.qkv_proj"), args=[cst.Arg(x_src)]),
        )])
        split = cst.parse_statement(
            f"{targets[attn.q]}, {targets[attn.k]}, {targets[attn.v]} = "
            "qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)\n"
        )
        before = [st for i, st in keep if i < first]
        after = [st.visit(_Replace()) for i, st in keep if i >= first]
        out = before + [qkv_stmt, split] + after
        self.mark(f"{attn.cls}.forward")
        return fn.with_changes(body=fn.body.with_changes(body=out))
