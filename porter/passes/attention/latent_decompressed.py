"""PT281 latent-decompressed: the rule `LatentDecompressed`; its `why` says what it rewrites and why."""

from __future__ import annotations

from dataclasses import replace

import libcst as cst

import libcst.matchers as m

from porter.analysis.cstutil import code, dotted, findall
from porter.analysis.latent_around import LatentAround
from porter.analysis.latent_attention import LatentAttention as Latent
from porter.analysis.layouts import attention_call_names
from porter.passes.attention.latent_attention import _ATTN, _HEAD, LatentAttention, _linear
from porter.passes.base import Example
from porter.rules_data import strip_table

_HEADS = "self.num_local_heads"

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
            self.q_a_proj = ReplicatedLinear(
                config.hidden_size,
                self.q_lora_rank,
                bias=False,
                quant_config=quant_config,
                prefix=f"{prefix}.q_a_proj",
            )
            self.q_a_layernorm = Norm(self.q_lora_rank)
            self.q_b_proj = ColumnParallelLinear(
                self.q_lora_rank,
                self.num_heads * self.qk_head_dim,
                bias=False,
                quant_config=quant_config,
                prefix=f"{prefix}.q_b_proj",
            )
            self.q_proj = None
        else:
            self.q_proj = ColumnParallelLinear(
                config.hidden_size,
                self.num_heads * self.qk_head_dim,
                bias=False,
                quant_config=quant_config,
                prefix=f"{prefix}.q_proj",
            )
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        self.kv_a_proj_with_mqa = ReplicatedLinear(
            config.hidden_size,
            config.kv_lora_rank + config.qk_rope_head_dim,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.kv_a_proj_with_mqa",
        )
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
        self.rope_by_head = config.rope_parameters["rope_type"] == "deepseek_yarn"
        self.num_local_heads = self.num_heads // get_tensor_model_parallel_world_size()
        self.attn = Attention(self.num_local_heads, self.qk_nope_head_dim + self.qk_rope_head_dim, self.scaling, num_kv_heads=self.num_local_heads, cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn")
    
    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.q_proj is not None:
            q, _ = self.q_proj(x)
        else:
            q, _ = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)[0]))
        head_size = self.qk_nope_head_dim + self.qk_rope_head_dim
        q_nope, q_pe = q.view(-1, self.num_local_heads, head_size).split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent, _ = self.kv_a_proj_with_mqa(x)
        kv_a, k_pe = latent.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv, _ = self.kv_b_proj(self.kv_a_layernorm(kv_a.contiguous()))
        k_nope, v = kv.view(-1, self.num_local_heads, self.qk_nope_head_dim + self.v_head_dim).split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        if self.rope_by_head:  # the engine's DeepSeek YaRN reads [tokens, heads, rope dims]
            q_pe, k_pe = self.rotary_emb(positions, q_pe.contiguous(), k_pe.reshape(-1, 1, self.qk_rope_head_dim).contiguous())
        else:  # its rotary kernel on the CPU reads [tokens, heads * rope dims]
            q_pe, k_pe = self.rotary_emb(positions, q_pe.reshape(-1, self.num_local_heads * self.qk_rope_head_dim), k_pe.reshape(-1, self.qk_rope_head_dim).contiguous())
            q_pe, k_pe = q_pe.view(-1, self.num_local_heads, self.qk_rope_head_dim), k_pe.view(-1, 1, self.qk_rope_head_dim)
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe.expand(-1, self.num_local_heads, -1)), dim=-1)
        # values padded to the q/k head size (the engine's Attention has one), cut back after it
        v = nn.functional.pad(v, [0, head_size - self.v_head_dim])
        out = self.attn(q.reshape(-1, self.num_local_heads * head_size), k.reshape(-1, self.num_local_heads * head_size), v.reshape(-1, self.num_local_heads * head_size))
        out, _ = self.o_proj(out.view(-1, self.num_local_heads, head_size)[..., : self.v_head_dim].reshape(-1, self.num_local_heads * self.v_head_dim))
        return out
'''


# what dots3_note computes around its latent attention (porter/analysis/latent_around.py): a per-head
# sigmoid gate, rescaled latents, a norm over the rope key; HF hands its attention call a sliding window
_ATTN_AROUND = '''
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
        self.g_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)
        self.k_rope_norm = Norm(self.qk_rope_head_dim)
        self.q_lora_scale = (config.hidden_size / self.q_lora_rank) ** 0.5
        self.kv_lora_scale = (config.hidden_size / self.kv_lora_rank) ** 0.5
        self.sliding_window = config.sliding_window

    def forward(self, x, position_embeddings, attention_mask):
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)) * self.q_lora_scale)
        q = q.view(1, -1, self.num_heads, self.qk_head_dim).transpose(1, 2)
        q_pass, q_rot = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        compressed = self.kv_a_proj_with_mqa(x)
        kv_nope, k_rot = torch.split(compressed, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(kv_nope) * self.kv_lora_scale).view(1, -1, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_pass, v = torch.split(kv, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_rot = self.k_rope_norm(k_rot)
        cos, sin = position_embeddings
        q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot, cos, sin)
        k = torch.cat((k_pass, k_rot.expand(*k_pass.shape[:-1], -1)), dim=-1)
        out, _ = attention_interface(self, torch.cat((q_pass, q_rot), dim=-1), k, v, attention_mask, scaling=self.scaling, sliding_window=self.sliding_window)
        out = out * self.g_proj(x).view(1, -1, self.num_heads, 1).sigmoid()
        return self.o_proj(out.reshape(1, -1, self.num_heads * self.v_head_dim)), None
'''

_AFTER_AROUND = '''
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
            self.q_a_proj = ReplicatedLinear(
                config.hidden_size,
                self.q_lora_rank,
                bias=False,
                quant_config=quant_config,
                prefix=f"{prefix}.q_a_proj",
            )
            self.q_a_layernorm = Norm(self.q_lora_rank)
            self.q_b_proj = ColumnParallelLinear(
                self.q_lora_rank,
                self.num_heads * self.qk_head_dim,
                bias=False,
                quant_config=quant_config,
                prefix=f"{prefix}.q_b_proj",
            )
            self.q_proj = None
        else:
            self.q_proj = ColumnParallelLinear(
                config.hidden_size,
                self.num_heads * self.qk_head_dim,
                bias=False,
                quant_config=quant_config,
                prefix=f"{prefix}.q_proj",
            )
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        self.kv_a_proj_with_mqa = ReplicatedLinear(
            config.hidden_size,
            config.kv_lora_rank + config.qk_rope_head_dim,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.kv_a_proj_with_mqa",
        )
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
        self.g_proj = ColumnParallelLinear(
            config.hidden_size,
            self.num_heads,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.g_proj",
        )
        self.scaling = self.qk_head_dim**-0.5
        self.k_rope_norm = Norm(self.qk_rope_head_dim)
        self.q_lora_scale = (config.hidden_size / self.q_lora_rank) ** 0.5
        self.kv_lora_scale = (config.hidden_size / self.kv_lora_rank) ** 0.5
        self.sliding_window = config.sliding_window
        if config.rope_parameters["rope_type"] == "yarn":
            # YaRN with DeepSeek's mscale ratio on cos/sin, as the engine's DeepSeek-V2 port builds it
            config.rope_parameters["rope_type"] = "deepseek_yarn"
        self.rotary_emb = get_rope(self.qk_rope_head_dim, max_position=config.max_position_embeddings, rope_parameters=config.rope_parameters, is_neox_style=True)
        self.rope_by_head = config.rope_parameters["rope_type"] == "deepseek_yarn"
        self.num_local_heads = self.num_heads // get_tensor_model_parallel_world_size()
        self.attn = Attention(self.num_local_heads, self.qk_nope_head_dim + self.qk_rope_head_dim, self.scaling, num_kv_heads=self.num_local_heads, cache_config=cache_config, quant_config=quant_config, per_layer_sliding_window=self.sliding_window, prefix=f"{prefix}.attn")
    
    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.q_proj is not None:
            q, _ = self.q_proj(x)
        else:
            q, _ = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)[0]) * self.q_lora_scale)
        head_size = self.qk_nope_head_dim + self.qk_rope_head_dim
        q_nope, q_pe = q.view(-1, self.num_local_heads, head_size).split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent, _ = self.kv_a_proj_with_mqa(x)
        kv_a, k_pe = latent.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv, _ = self.kv_b_proj(self.kv_a_layernorm(kv_a.contiguous()) * self.kv_lora_scale)
        k_pe = self.k_rope_norm(k_pe.contiguous())  # the shared rope key normed before the rotary
        k_nope, v = kv.view(-1, self.num_local_heads, self.qk_nope_head_dim + self.v_head_dim).split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        if self.rope_by_head:  # the engine's DeepSeek YaRN reads [tokens, heads, rope dims]
            q_pe, k_pe = self.rotary_emb(positions, q_pe.contiguous(), k_pe.reshape(-1, 1, self.qk_rope_head_dim).contiguous())
        else:  # its rotary kernel on the CPU reads [tokens, heads * rope dims]
            q_pe, k_pe = self.rotary_emb(positions, q_pe.reshape(-1, self.num_local_heads * self.qk_rope_head_dim), k_pe.reshape(-1, self.qk_rope_head_dim).contiguous())
            q_pe, k_pe = q_pe.view(-1, self.num_local_heads, self.qk_rope_head_dim), k_pe.view(-1, 1, self.qk_rope_head_dim)
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe.expand(-1, self.num_local_heads, -1)), dim=-1)
        # values padded to the q/k head size (the engine's Attention has one), cut back after it
        v = nn.functional.pad(v, [0, head_size - self.v_head_dim])
        out = self.attn(q.reshape(-1, self.num_local_heads * head_size), k.reshape(-1, self.num_local_heads * head_size), v.reshape(-1, self.num_local_heads * head_size))
        gate, _ = self.g_proj(x)
        out = out.view(-1, self.num_local_heads, head_size)[..., : self.v_head_dim] * gate.sigmoid().unsqueeze(-1)  # HF's per-head gate
        out, _ = self.o_proj(out.reshape(-1, self.num_local_heads * self.v_head_dim))
        return out
'''


class LatentDecompressed(LatentAttention):
    code = "PT281"
    name = "latent-decompressed"
    why = (
        "Multi-head latent attention (porter/analysis/latent_attention.py) under a model type the engine "
        "does not treat as DeepSeek-style MLA (vLLM builds its MLA cache only for the model types "
        "ModelArchConfigConvertor.is_deepseek_mla lists; for any other its MLA layer refuses the head "
        "size): computed as the engine's native MiniCPM3 computes it, ordinary attention over the "
        "decompressed keys and values. The projections keep the checkpoint's names (q_proj, or q_a_proj, "
        "q_a_layernorm and q_b_proj; kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj); each head's "
        "key is its no-rope part from kv_b_proj with the one shared rotated rope part appended, the "
        "values are zero-padded to the q/k head size for the engine's `Attention` (one head size) and "
        "cut back after it (exact: the padded dims only add zeros). The softmax scale is HF's own "
        "(YaRN's mscale included); the rotary pairs the rope dims as HF's helper does, YaRN as the "
        "engine's DeepSeek YaRN. The cache holds per-head keys and values (the models this serves are "
        "listed in rules/hf_strip.yaml latent_decompressed_model_types). What forward computes around the "
        "projections (porter/analysis/latent_around.py) is kept: a per-head sigmoid gate on the attention "
        "output (its projection split across ranks as the heads), the normed latents rescaled, a norm over "
        "the shared rope key before the rotary, HF's sliding window as the layer's; a rope table per layer "
        "type when the rotary keys rope_parameters so (HF's spans the rope dims: no partial factor). The "
        "rope dims are rotated as [tokens, heads, rope dims] for DeepSeek's YaRN and flat for every other "
        "rope type, whose CPU kernel misreads a 3-D tensor (dots3_note measured 11.8 from HF before)."
    )
    examples = [Example(_HEAD + "\n" + _ATTN, _HEAD + "\n" + _AFTER, seed={
        # the example's model type ("example") listed among those verified this way
        "strip": replace(strip_table(), latent_decompressed_model_types=frozenset({"example"}))}),
        Example(_HEAD + "\n" + _ATTN_AROUND, _HEAD + "\n" + _AFTER_AROUND, seed={
            "strip": replace(strip_table(), latent_decompressed_model_types=frozenset({"example"})),
            "latent_arounds": {"Attn": LatentAround(gate="g_proj", q_scale="self.q_lora_scale",
                                                     kv_scale="self.kv_lora_scale", k_rope_norm="k_rope_norm")}})]

    @classmethod
    def applies(cls, ctx) -> bool:
        return bool(ctx.plan.latent_attentions) and ctx.plan.model_type in ctx.table.latent_decompressed_model_types

    def _modules(self, la: Latent, calls: dict[str, cst.Call]) -> list[str]:
        use = self.ctx.use
        col, row, rep = use("ColumnParallelLinear"), use("RowParallelLinear"), use("ReplicatedLinear")
        low = [f"self.{la.q_a} = {_linear(rep, *self._args(calls[la.q_a]), la.q_a)}",  # type: ignore[index]
               f"self.{la.q_norm} = {code_of(calls[la.q_norm])}",  # type: ignore[index]
               f"self.{la.q_b} = {_linear(col, *self._args(calls[la.q_b]), la.q_b)}"] if la.q_a else []  # type: ignore[index]
        full = [f"self.{la.q} = {_linear(col, *self._args(calls[la.q]), la.q)}"] if la.q else []
        if low and full:
            pad = lambda lines: "\n".join("    " + x for s in lines for x in s.splitlines())  # noqa: E731
            out = [f"if {la.q_lora} is not None:\n{pad(low)}\n    self.{la.q} = None\n"
                   f"else:\n{pad(full)}\n    self.{la.q_a} = self.{la.q_norm} = self.{la.q_b} = None"]
        else:
            out = low + full
        gate = self._around(la).gate
        # a per-head output gate: one value per head, split across ranks as the heads are
        gated = [f"self.{gate} = {_linear(col, *self._args(calls[gate]), gate)}"] if gate else []
        return [*out, f"self.{la.kv_a} = {_linear(rep, *self._args(calls[la.kv_a]), la.kv_a)}",
                f"self.{la.kv_norm} = {code_of(calls[la.kv_norm])}",
                f"self.{la.kv_b} = {_linear(col, *self._args(calls[la.kv_b]), la.kv_b)}",
                f"self.{la.o} = {_linear(row, *self._args(calls[la.o]), la.o)}", *gated]

    def _around(self, la: Latent) -> LatentAround:
        return self.plan.latent_arounds.get(la.cls) or LatentAround()

    def _mods(self, la: Latent) -> set[str]:
        return super()._mods(la) | ({self._around(la).gate} - {None})  # type: ignore[operator]

    def _rope(self, la: Latent) -> list[str]:
        keyed = [c for c in self.plan.rotary_classes if findall(self.ctx.idx.classes[c].node, m.Subscript(
            value=m.Attribute(attr=m.Name("rope_parameters")), slice=[m.SubscriptElement(m.Index(m.Name()))]))]
        # the engine's DeepSeek YaRN rotates [tokens, heads, rope dims]; its rotary kernel on the CPU (every
        # other rope type) reads [tokens, heads * rope dims] and misreads a 3-D tensor (rows of one head)
        by_head = "self.rope_by_head = {}[\"rope_type\"] == \"deepseek_yarn\""
        if not keyed:
            return [*super()._rope(la), by_head.format("config.rope_parameters")]
        # one table per layer type (its rope_parameters keyed so); HF's table spans the rope dims
        # (head_dim times its partial_rotary_factor), which the engine's is without the factor
        return [
            "rope_parameters = {**config.rope_parameters[config.layer_types[layer_idx]], \"partial_rotary_factor\": 1.0}",
            'if rope_parameters["rope_type"] == "yarn":\n'
            "    # YaRN with DeepSeek's mscale ratio on cos/sin, as the engine's DeepSeek-V2 port builds it\n"
            '    rope_parameters["rope_type"] = "deepseek_yarn"',
            f"self.rotary_emb = {self.ctx.use('get_rope')}({la.rope_dim}, max_position=config.max_position_embeddings, "
            f"rope_parameters=rope_parameters, is_neox_style={la.neox})",
            by_head.format("rope_parameters"),
        ]

    def _window(self, fwd: cst.FunctionDef) -> str:
        """`per_layer_sliding_window=...` when HF hands its attention call a sliding window."""
        names = attention_call_names(self.ctx.idx)
        call = next((c for c in findall(fwd, m.Call()) if dotted(c.func) in names), None)  # type: ignore[attr-defined]
        found = next((code(a.value) for a in call.args if a.keyword and a.keyword.value == "sliding_window"), None) \
            if isinstance(call, cst.Call) else None
        return f"per_layer_sliding_window={found}, " if found else ""

    def _layer(self, la: Latent, fwd: cst.FunctionDef) -> list[str]:
        scale = self._scale(la, fwd)
        tp = self.ctx.use("get_tensor_model_parallel_world_size")
        return [*self._rope(la), f"{_HEADS} = {la.heads} // {tp}()",
                f"self.attn = {self.ctx.use('Attention')}({_HEADS}, {la.nope_dim} + {la.rope_dim}, {scale}, "
                f"num_kv_heads={_HEADS}, cache_config=cache_config, quant_config=quant_config, {self._window(fwd)}"
                'prefix=f"{prefix}.attn")']

    def _forward(self, la: Latent, fwd: cst.FunctionDef) -> cst.FunctionDef:
        x, h = fwd.params.params[1].name.value, _HEADS
        nope, rope, v, kvl = la.nope_dim, la.rope_dim, la.v_dim, la.kv_lora
        qk = "head_size"
        around = self._around(la)
        q_scale = f" * {around.q_scale}" if around.q_scale else ""
        kv_scale = f" * {around.kv_scale}" if around.kv_scale else ""
        low = f"q, _ = self.{la.q_b}(self.{la.q_norm}(self.{la.q_a}({x})[0]){q_scale})"
        full = f"q, _ = self.{la.q}({x})"
        query = (f"if self.{la.q} is not None:\n        {full}\n    else:\n        {low}" if la.q and la.q_a
                 else (low if la.q_a else full))
        text = (
            f"def forward(self, {x}: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:\n"
            f"    {query}\n"
            f"    head_size = {nope} + {rope}\n"
            f"    q_nope, q_pe = q.view(-1, {h}, {qk}).split([{nope}, {rope}], dim=-1)\n"
            f"    latent, _ = self.{la.kv_a}({x})\n"
            f"    kv_a, k_pe = latent.split([{kvl}, {rope}], dim=-1)\n"
            f"    kv, _ = self.{la.kv_b}(self.{la.kv_norm}(kv_a.contiguous()){kv_scale})\n"
            + (f"    k_pe = self.{around.k_rope_norm}(k_pe.contiguous())  # the shared rope key normed before the rotary\n"
               if around.k_rope_norm else "") +
            f"    k_nope, v = kv.view(-1, {h}, {nope} + {v}).split([{nope}, {v}], dim=-1)\n"
            "    if self.rope_by_head:  # the engine's DeepSeek YaRN reads [tokens, heads, rope dims]\n"
            f"        q_pe, k_pe = self.rotary_emb(positions, q_pe.contiguous(), k_pe.reshape(-1, 1, {rope}).contiguous())\n"
            "    else:  # its rotary kernel on the CPU reads [tokens, heads * rope dims]\n"
            f"        q_pe, k_pe = self.rotary_emb(positions, q_pe.reshape(-1, {h} * {rope}), k_pe.reshape(-1, {rope}).contiguous())\n"
            f"        q_pe, k_pe = q_pe.view(-1, {h}, {rope}), k_pe.view(-1, 1, {rope})\n"
            "    q = torch.cat((q_nope, q_pe), dim=-1)\n"
            f"    k = torch.cat((k_nope, k_pe.expand(-1, {h}, -1)), dim=-1)\n"
            "    # values padded to the q/k head size (the engine's Attention has one), cut back after it\n"
            f"    v = nn.functional.pad(v, [0, {qk} - {v}])\n"
            f"    out = self.attn(q.reshape(-1, {h} * {qk}), k.reshape(-1, {h} * {qk}), v.reshape(-1, {h} * {qk}))\n"
            + (f"    gate, _ = self.{around.gate}({x})\n"
               f"    out = out.view(-1, {h}, {qk})[..., : {v}] * gate.sigmoid().unsqueeze(-1)  # HF's per-head gate\n"
               f"    out, _ = self.{la.o}(out.reshape(-1, {h} * {v}))\n" if around.gate else
               f"    out, _ = self.{la.o}(out.view(-1, {h}, {qk})[..., : {v}].reshape(-1, {h} * {v}))\n") +
            "    return out\n")
        return cst.parse_statement(text).with_changes(leading_lines=[cst.EmptyLine()])  # type: ignore[return-value]


def code_of(node: cst.CSTNode) -> str:
    return cst.Module(body=[]).code_for_node(node)
