"""PT280 latent-attention: the rule `LatentAttention`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, dotted, findall, self_attr
from porter.analysis.latent_attention import LatentAttention as Latent
from porter.analysis.layouts import attention_call_names
from porter.passes.base import Example, Rule

_ATTN = '''
class Attn(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        self.q_proj = None if self.q_lora_rank is not None else nn.Linear(config.hidden_size, self.num_heads * self.qk_head_dim, bias=False)
        self.q_a_proj = nn.Linear(config.hidden_size, self.q_lora_rank, bias=False) if self.q_lora_rank is not None else None
        self.q_a_layernorm = Norm(self.q_lora_rank) if self.q_lora_rank is not None else None
        self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False) if self.q_lora_rank is not None else None
        self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, config.kv_lora_rank + config.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = Norm(config.kv_lora_rank)
        self.kv_b_proj = nn.Linear(config.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, config.hidden_size, bias=False)
        self.scaling = self.qk_head_dim**-0.5

    def forward(self, x, position_embeddings, attention_mask):
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(1, -1, self.num_heads, self.qk_head_dim).transpose(1, 2)
        q_pass, q_rot = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        compressed = self.kv_a_proj_with_mqa(x)
        kv_nope, k_rot = torch.split(compressed, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(kv_nope)).view(1, -1, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_pass, v = torch.split(kv, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        cos, sin = position_embeddings
        q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot, cos, sin)
        k = torch.cat((k_pass, k_rot.expand(*k_pass.shape[:-1], -1)), dim=-1)
        out, _ = attention_interface(self, torch.cat((q_pass, q_rot), dim=-1), k, v, attention_mask, scaling=self.scaling)
        return self.o_proj(out.reshape(1, -1, self.num_heads * self.v_head_dim)), None
'''

_HEAD = '''import torch
from torch import nn


def rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class Norm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
'''

_AFTER = '''
class Attn(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        if self.q_lora_rank is not None:
            # the low-rank query and the KV latent read the same input: one replicated projection
            self.fused_qkv_a_proj = MergedColumnParallelLinear(
                config.hidden_size,
                [self.q_lora_rank, config.kv_lora_rank + config.qk_rope_head_dim],
                bias=False,
                disable_tp=True,
                quant_config=quant_config,
                prefix=f"{prefix}.fused_qkv_a_proj",
            )
            self.q_a_layernorm = Norm(self.q_lora_rank)
            self.q_b_proj = ColumnParallelLinear(
                self.q_lora_rank,
                self.num_heads * self.qk_head_dim,
                bias=False,
                quant_config=quant_config,
                prefix=f"{prefix}.q_b_proj",
            )
            self.q_proj = self.kv_a_proj_with_mqa = None
        else:
            self.q_proj = ColumnParallelLinear(
                config.hidden_size,
                self.num_heads * self.qk_head_dim,
                bias=False,
                quant_config=quant_config,
                prefix=f"{prefix}.q_proj",
            )
            self.kv_a_proj_with_mqa = ReplicatedLinear(
                config.hidden_size,
                config.kv_lora_rank + config.qk_rope_head_dim,
                bias=False,
                quant_config=quant_config,
                prefix=f"{prefix}.kv_a_proj_with_mqa",
            )
            self.fused_qkv_a_proj = self.q_a_layernorm = self.q_b_proj = None
        self.kv_a_layernorm = Norm(config.kv_lora_rank)
        self.kv_b_proj = ColumnParallelLinear(
            config.kv_lora_rank,
            self.num_heads * (self.qk_nope_head_dim + self.v_head_dim),
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.kv_b_proj",
        )
        self.o_proj = RowParallelLinear(
            self.num_heads * self.v_head_dim,
            config.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.scaling = self.qk_head_dim**-0.5
        if config.rope_parameters["rope_type"] == "yarn":
            # YaRN with DeepSeek's mscale ratio on cos/sin, as the engine's DeepSeek-V2 port builds it
            config.rope_parameters["rope_type"] = "deepseek_yarn"
        self.rotary_emb = get_rope(self.qk_rope_head_dim, max_position=config.max_position_embeddings, rope_parameters=config.rope_parameters, is_neox_style=True)
        self.mla_attn = MultiHeadLatentAttentionWrapper(config.hidden_size, self.num_heads // get_tensor_model_parallel_world_size(), self.scaling, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim, self.q_lora_rank, self.kv_lora_rank, MLAModules(kv_a_layernorm=self.kv_a_layernorm, kv_b_proj=self.kv_b_proj, rotary_emb=self.rotary_emb, o_proj=self.o_proj, fused_qkv_a_proj=self.fused_qkv_a_proj, kv_a_proj_with_mqa=self.kv_a_proj_with_mqa, q_a_layernorm=self.q_a_layernorm, q_b_proj=self.q_b_proj, q_proj=self.q_proj, indexer=None, is_sparse=False, topk_indices_buffer=None), cache_config=cache_config, quant_config=quant_config, prefix=prefix)
    
    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.mla_attn(positions, x, None)
'''


def _built(value: cst.BaseExpression) -> cst.Call | None:
    if isinstance(value, cst.IfExp):
        arms = [a for a in (value.body, value.orelse) if isinstance(a, cst.Call)]
        return arms[0] if len(arms) == 1 else None
    return value if isinstance(value, cst.Call) else None


def _module_assigns(st: cst.BaseStatement, mods: set[str]) -> dict[str, cst.Call] | None:
    """The attention's projections and norms statement ST builds: `self.<mod> = <call>` (or a
    conditional expression with one call arm), or an `if` whose arms hold only such statements
    (an older spelling of the optional low-rank query); None when ST builds anything else."""
    if isinstance(st, cst.If):
        out: dict[str, cst.Call] = {}
        arms = [st.body.body]
        orelse = st.orelse
        while orelse is not None:
            arms.append(orelse.body.body)
            orelse = orelse.orelse if isinstance(orelse, cst.If) else None
        for arm in arms:
            for inner in arm:
                found = _module_assigns(inner, mods)
                if found is None:
                    return None
                out.update(found)
        return out
    if not m.matches(st, m.SimpleStatementLine(body=[m.Assign(
            targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))])])):  # type: ignore[attr-defined]
        return None
    assign = st.body[0]  # type: ignore[attr-defined]
    attr = self_attr(assign.targets[0].target)
    call = _built(assign.value)
    return {attr: call} if attr in mods and call is not None else None


def _linear(kind: str, in_f: str, out_f: str, bias: str, attr: str, extra: str = "") -> str:
    return (f"{kind}(\n    {in_f},\n    {out_f},\n    bias={bias},\n{extra}    quant_config=quant_config,\n"
            f'    prefix=f"{{prefix}}.{attr}",\n)')


class LatentAttention(Rule):
    descends = False
    code = "PT280"
    name = "latent-attention"
    why = (
        "Multi-head latent attention (DeepSeek-V2's MLA; recognised by porter/analysis/"
        "latent_attention.py from its shapes and splits: a projection of the hidden states to a KV "
        "latent plus shared rope dims, a norm over the latent, an up-projection split into keys and "
        "values, a query of one projection or a low-rank pair) is built as the engine's "
        "`MultiHeadLatentAttentionWrapper` with its `MLAModules`, as the engine's own DeepSeek-V2 "
        "port does: the KV cache holds the normed latent and the rotated rope dims (kv_lora_rank + "
        "qk_rope_head_dim wide), not per-head keys and values. The projections keep the checkpoint's "
        "names; with a low-rank query its first projection and the KV latent projection become one "
        "replicated `fused_qkv_a_proj` (stacked when loading), else the KV one is a `ReplicatedLinear`. "
        "The softmax scale is HF's own (`self.scaling`, YaRN's mscale included); the rotary over the "
        "rope dims pairs them as HF's helper does (neox halves, interleaved pairs, or the config flag "
        "choosing between them), YaRN as the engine's DeepSeek YaRN (mscale ratio on cos/sin)."
    )
    examples = [Example(_HEAD + "\n" + _ATTN, _HEAD + "\n" + _AFTER)]

    @classmethod
    def applies(cls, ctx) -> bool:
        return bool(ctx.plan.latent_attentions) and ctx.plan.model_type not in ctx.table.latent_decompressed_model_types

    def leave_ClassDef(self, original, updated):
        la = self.plan.latent_attention(original.name.value)
        super().leave_ClassDef(original, updated)
        if la is None:
            return updated
        init = next(f for f in updated.body.body if m.matches(f, m.FunctionDef(name=m.Name("__init__"))))
        fwd = next(f for f in updated.body.body if m.matches(f, m.FunctionDef(name=m.Name("forward"))))
        self.ctx.single_return.add(la.cls)
        self.ctx.needs_positions.add(la.cls)
        body = [self._init(la, init, fwd), self._forward(la, fwd)]  # (HF's helper methods go: the engine's layer computes)
        return updated.with_changes(body=updated.body.with_changes(body=body))

    def _init(self, la: Latent, init: cst.FunctionDef, fwd: cst.FunctionDef) -> cst.FunctionDef:
        mods = self._mods(la)
        calls: dict[str, cst.Call] = {}
        kept: list[cst.BaseStatement] = []
        at = None
        for st in init.body.body:
            found = _module_assigns(st, mods)
            if found:
                calls.update(found)
                at = len(kept) if at is None else at
                continue
            kept.append(st)
        built = [cst.parse_statement(s) for s in self._modules(la, calls)]
        body = [*kept[:at], *built, *kept[at:], *[cst.parse_statement(s) for s in self._layer(la, fwd)]]
        return init.with_changes(body=init.body.with_changes(body=body))

    def _mods(self, la: Latent) -> set[str]:
        """The attributes whose `__init__` statements `_modules` builds anew."""
        return {la.kv_a, la.kv_norm, la.kv_b, la.o, la.q, la.q_a, la.q_norm, la.q_b} - {None}  # type: ignore[return-value]

    def _args(self, call: cst.Call) -> tuple[str, str, str]:
        pos = [code(a.value) for a in call.args if a.keyword is None]
        kw = {a.keyword.value: code(a.value) for a in call.args if a.keyword is not None}
        return pos[0], pos[1], kw.get("bias", pos[2] if len(pos) > 2 else "True")

    def _modules(self, la: Latent, calls: dict[str, cst.Call]) -> list[str]:
        use = self.ctx.use
        col, row, rep = use("ColumnParallelLinear"), use("RowParallelLinear"), use("ReplicatedLinear")
        kv_in, kv_out, kv_bias = self._args(calls[la.kv_a])
        low: list[str] = []
        if la.q_a:
            q_in, q_out, q_bias = self._args(calls[la.q_a])
            merged = use("MergedColumnParallelLinear")
            bias = q_bias if q_bias == kv_bias else f"{q_bias} or {kv_bias}"
            low = [
                "# the low-rank query and the KV latent read the same input: one replicated projection",
                f"self.fused_qkv_a_proj = {_linear(merged, q_in, f'[{q_out}, {kv_out}]', bias, 'fused_qkv_a_proj', '    disable_tp=True,' + chr(10))}",
                f"self.{la.q_norm} = {code(calls[la.q_norm])}",  # type: ignore[index]
                f"self.{la.q_b} = {_linear(col, *self._args(calls[la.q_b]), la.q_b)}",  # type: ignore[index]
            ]
        full: list[str] = []
        if la.q:
            full = [f"self.{la.q} = {_linear(col, *self._args(calls[la.q]), la.q)}",
                    f"self.{la.kv_a} = {_linear(rep, kv_in, kv_out, kv_bias, la.kv_a)}"]
        if low and full:
            pad = lambda lines: "\n".join("    " + x for s in lines for x in s.splitlines())  # noqa: E731
            out = [f"if {la.q_lora} is not None:\n{pad(low)}\n    self.{la.q} = self.{la.kv_a} = None\n"
                   f"else:\n{pad(full)}\n    self.fused_qkv_a_proj = self.{la.q_norm} = self.{la.q_b} = None"]
        elif low:
            out = [*low[1:], f"self.{la.kv_a} = None"]
        else:
            out = [*full, f"self.fused_qkv_a_proj = self.{la.q_norm} = self.{la.q_b} = None"]
        return [*out, f"self.{la.kv_norm} = {code(calls[la.kv_norm])}",
                f"self.{la.kv_b} = {_linear(col, *self._args(calls[la.kv_b]), la.kv_b)}",
                f"self.{la.o} = {_linear(row, *self._args(calls[la.o]), la.o)}"]

    def _scale(self, la: Latent, fwd: cst.FunctionDef) -> str:
        """The softmax scale HF's forward hands its attention call."""
        names = attention_call_names(self.ctx.idx)
        call = next((c for c in findall(fwd, m.Call()) if dotted(c.func) in names), None)  # type: ignore[attr-defined]
        scale = next((code(a.value) for a in call.args if a.keyword and a.keyword.value == "scaling"), None) \
            if isinstance(call, cst.Call) else None
        if scale is None:
            raise self.ctx.idx.error(f"cannot port latent attention: no softmax scale passed in {la.cls}.forward",
                                     fwd, rule=self.name)
        return scale

    def _rope(self, la: Latent) -> list[str]:
        return [
            'if config.rope_parameters["rope_type"] == "yarn":\n'
            "    # YaRN with DeepSeek's mscale ratio on cos/sin, as the engine's DeepSeek-V2 port builds it\n"
            '    config.rope_parameters["rope_type"] = "deepseek_yarn"',
            f"self.rotary_emb = {self.ctx.use('get_rope')}({la.rope_dim}, max_position=config.max_position_embeddings, "
            f"rope_parameters=config.rope_parameters, is_neox_style={la.neox})",
        ]

    def _layer(self, la: Latent, fwd: cst.FunctionDef) -> list[str]:
        scale = self._scale(la, fwd)
        q_lora = la.q_lora if la.q_a else "None"
        tp = self.ctx.use("get_tensor_model_parallel_world_size")
        mods = ", ".join(f"{k}=self.{v}" if v else f"{k}=None" for k, v in (
            ("kv_a_layernorm", la.kv_norm), ("kv_b_proj", la.kv_b), ("rotary_emb", "rotary_emb"), ("o_proj", la.o),
            ("fused_qkv_a_proj", "fused_qkv_a_proj"), ("kv_a_proj_with_mqa", la.kv_a),
            ("q_a_layernorm", la.q_norm), ("q_b_proj", la.q_b), ("q_proj", la.q)))
        return [
            *self._rope(la),
            f"self.mla_attn = {self.ctx.use('MultiHeadLatentAttentionWrapper')}({la.hidden}, {la.heads} // {tp}(), "
            f"{scale}, {la.nope_dim}, {la.rope_dim}, {la.v_dim}, {q_lora}, {la.kv_lora}, "
            f"{self.ctx.use('MLAModules')}({mods}, indexer=None, is_sparse=False, topk_indices_buffer=None), "
            "cache_config=cache_config, quant_config=quant_config, prefix=prefix)",
        ]

    def _forward(self, la: Latent, fwd: cst.FunctionDef) -> cst.FunctionDef:
        x = fwd.params.params[1].name.value
        new = cst.parse_statement(
            f"def forward(self, {x}: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:\n"
            f"    return self.mla_attn(positions, {x}, None)\n")
        return new.with_changes(leading_lines=[cst.EmptyLine()])  # type: ignore[return-value]
