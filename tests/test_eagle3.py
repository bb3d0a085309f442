"""End to end: an EAGLE-3 draft made here (one random decoder layer over three of the target's hidden
states, vLLM's `LlamaForCausalLMEagle3` layout) speculates for the port and for the engine's native
class on the same tiny checkpoint (`speculative_config` method `eagle3`).

What the draft is handed is what PT333's hooks compute: the probe saves the auxiliary hidden states
of the target's first forward (porter.verify.probe, PORTER_VERIFY_AUX). The port's equal native's
and, for the layers before the last, HF's own hidden states (`output_hidden_states`: the residual
stream after each layer; HF normalises the last one, the engine hands the draft the stream before
the norm). Greedy speculative decoding keeps the target's tokens: port, native and HF agree.
"""

from __future__ import annotations

import json

import pytest
from engine_checkpoints import committed_port, tiny

pytestmark = pytest.mark.e2e

LAYERS = [0, 1, 2]  # the embedding output, after layer 1, after layer 2 (the tiny models have 2)


def _draft(config, out):
    """A random EAGLE-3 draft for a target of ``config``, saved to ``out``."""
    import torch
    from safetensors.torch import save_file

    h, i = config.hidden_size, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // heads
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.05).contiguous()

    tensors = {
        "midlayer.input_layernorm.weight": torch.ones(h),
        "midlayer.hidden_norm.weight": torch.ones(h),
        "midlayer.post_attention_layernorm.weight": torch.ones(h),
        "midlayer.self_attn.q_proj.weight": w(heads * d, 2 * h),
        "midlayer.self_attn.k_proj.weight": w(kv * d, 2 * h),
        "midlayer.self_attn.v_proj.weight": w(kv * d, 2 * h),
        "midlayer.self_attn.o_proj.weight": w(h, heads * d),
        "midlayer.mlp.gate_proj.weight": w(i, h),
        "midlayer.mlp.up_proj.weight": w(i, h),
        "midlayer.mlp.down_proj.weight": w(h, i),
        "fc.weight": w(h, len(LAYERS) * h),
        "norm.weight": torch.ones(h),
        "lm_head.weight": w(config.vocab_size, h),
    }
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
        "hidden_size": h, "intermediate_size": i, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": d, "num_hidden_layers": 1,
        "vocab_size": config.vocab_size, "draft_vocab_size": config.vocab_size,
        "rms_norm_eps": 1e-6, "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "torch_dtype": "float32", "eagle_config": {"eagle_aux_hidden_state_layer_ids": LAYERS},
    }))
    return out


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_eagle3_draft_gets_native_hidden_states_from_the_port(tmp_path, model_type):
    import torch

    from porter.verify.engine import Start, run_engines
    from porter.verify.tiny import hf_reference

    info = committed_port(model_type)
    assert "PT333" in (info.path / info.module.split(".")[0] / f"modeling_{model_type}.py").read_text()
    spec, model, prompts, ckpt, native_ckpt = tiny(info, tmp_path)
    assert model.config.num_hidden_layers == len(LAYERS) - 1
    draft = _draft(model.config, tmp_path / "draft")
    kw = dict(max_tokens=spec.max_new_tokens, top_logprobs=1, max_model_len=256,
              speculative={"method": "eagle3", "model": str(draft), "num_speculative_tokens": 2})
    port, native = run_engines([Start(ckpt, 1), Start(native_ckpt, 1)], prompts, port=info, **kw)
    assert port.ok, (port.error, port.log_tail[-3000:])
    assert all(w["module"].startswith(info.package + ".") for w in port.workers), port.workers
    assert native.ok, (native.error, native.log_tail[-3000:])

    assert port.aux is not None and native.aux is not None, "the target handed the draft nothing"
    assert torch.equal(port.aux["input_ids"], native.aux["input_ids"])
    assert len(port.aux["aux"]) == len(native.aux["aux"]) == len(LAYERS)
    vs_native = max((a - b).abs().max().item() for a, b in zip(port.aux["aux"], native.aux["aux"], strict=True))

    # HF's hidden states of the same prompts, in the order the engine ran them (its first forward
    # is the batched prefill of every prompt: their tokens one after another)
    ids = port.aux["input_ids"].tolist()
    with torch.no_grad():
        states = []
        for p in prompts:
            hs = model(torch.tensor([p]), output_hidden_states=True).hidden_states
            states.append(torch.stack([hs[k][0] for k in LAYERS[:-1]]))
    assert ids == [t for p in prompts for t in p], "the first forward was not the prefill of every prompt"
    hf = torch.cat(states, dim=1)
    vs_hf = max((port.aux["aux"][k] - hf[k]).abs().max().item() for k in range(len(LAYERS) - 1))
    scale = hf.abs().max().item()
    print(f"{model_type} EAGLE-3 aux hidden states (layers {LAYERS}, {len(ids)} tokens): port vs native "
          f"max |Δ| {vs_native:.2e}; port vs HF (layers {LAYERS[:-1]}) {vs_hf:.2e} (|h| up to {scale:.2f})")
    # hidden states are not logprobs: float32 agreement relative to their size (HF's and the
    # engine's kernels sum in different orders), and native's exactly where the port computes alike
    assert vs_native <= 1e-5 * scale and vs_hf <= 1e-5 * scale, (vs_native, vs_hf, scale)

    refs = [r["tokens"] for r in hf_reference(model, prompts, spec)]
    assert [r["tokens"] for r in port.results] == [r["tokens"] for r in native.results] == refs
