"""End to end: quantized checkpoints made here, served through the port and through the engine's
native class on the same checkpoint (tests/engine_checkpoints.py).

W8A8: a compressed-tensors int8 checkpoint (every projection, per-channel weights, per-token dynamic
activations) gives the port exactly native's tokens. HF is no reference here: the engine's int8
GEMM (oneDNN, bfloat16 activations only) is inexact on an AVX2-only CPU (../shared/facts.md), but port and native run the same
kernel on the same layers (the probe records the layers' quantization methods), so their logprobs
agree within THRESHOLD too.

GPTQ: a 4-bit GPTQ checkpoint (qweight, qzeros, scales, g_idx; tests/engine_checkpoints.py) loads
into port and native with every parameter equal, digest for digest, as the engine's loader leaves
it. Its forward needs the CPU build's 4-bit kernel (cpu_gemm_wna16), which an AVX2-only build
lacks: where the engine runs it, port and native give the same tokens; where it does not, both fail
alike, and the test prints which happened.

Mixtral's quantized experts need an int8 / 4-bit MoE method of the CPU build, which an AVX2-only
build has none of: the engine refuses the model while building it (before any weight loads). Where
that happens, the port must be refused exactly as native is, and the test prints it."""

from __future__ import annotations

import pytest
from engine_checkpoints import committed_port, gptq, tiny, w8a8

from porter.verify import THRESHOLD

pytestmark = pytest.mark.e2e


# the projections of one decoder layer: every one is quantized
PER_LAYER = {
    "llama": lambda c: 7, "qwen2": lambda c: 7,  # q, k, v, o; gate, up, down
    "mixtral": lambda c: 4 + 3 * c.num_local_experts,  # q, k, v, o; w1, w2, w3 of each expert
    "gpt2": lambda c: 4,  # c_attn, attn.c_proj; c_fc, mlp.c_proj
    "falcon": lambda c: 4,  # query_key_value, dense; dense_h_to_4h, dense_4h_to_h
}


def _refused_alike(model_type: str, kind: str, port, native) -> bool:
    """True when the engine refused to build both models (no load record): then with one error."""
    if port.workers or native.workers:
        return False
    assert not port.ok and not native.ok, (port.error, native.error)
    assert port.error and port.error == native.error, (port.error, native.error)
    print(f"{model_type} {kind}: this build refuses port and native alike: {port.error}")
    return True


def _delta(a: list[dict], b: list[dict]) -> float:
    """The largest |Δ| between two runs' logprobs (prompt and decode) over the ids both returned."""
    worst = 0.0
    for ra, rb in zip(a, b, strict=True):
        for key in ("prompt_logprobs", "logprobs"):
            for pa, pb in zip(ra[key], rb[key], strict=True):
                pa, pb = pa or {}, pb or {}
                assert set(pa) == set(pb), (key, pa, pb)
                worst = max([worst, *(abs(pa[t][0] - pb[t][0]) for t in pa)])
    return worst


@pytest.mark.parametrize("model_type", sorted(PER_LAYER))
def test_w8a8_checkpoint_port_gives_natives_tokens(tmp_path, model_type):
    from porter.verify.engine import Start, run_engines

    info = committed_port(model_type)
    spec, model, prompts, ckpt, native_ckpt = tiny(info, tmp_path)
    port_q, n = w8a8(ckpt, tmp_path / "w8a8", model)
    assert n == model.config.num_hidden_layers * PER_LAYER[model_type](model.config), n
    native_q, _ = w8a8(native_ckpt, tmp_path / "w8a8-native", model)
    kw = dict(max_tokens=spec.max_new_tokens, top_logprobs=spec.top_logprobs, max_model_len=256,
              dtype="bfloat16")  # (the CPU's int8 GEMM takes bfloat16 activations only)
    port, native = run_engines([Start(port_q, 1), Start(native_q, 1)], prompts, port=info, **kw)
    if _refused_alike(model_type, "W8A8", port, native):
        return
    assert port.ok, (port.error, port.log_tail[-3000:])
    assert native.ok, (native.error, native.log_tail[-3000:])
    (pw,), (nw,) = port.workers, native.workers
    assert pw["module"].startswith(info.package + "."), pw
    print(f"{model_type} W8A8 ({n} projections): port layers {pw['quant_methods']}, "
          f"native {nw['quant_methods']}")
    # every parameter (int8 weights, their scales) written by the checkpoint, but the attention
    # layers' KV-cache scales, which the engine sets after loading, in native as in the port
    for key in ("not_returned", "unwritten"):
        assert all(".attn." in k for k in [*pw[key], *nw[key]]), (pw[key], nw[key])
        assert set(pw[key]) == set(nw[key])
    assert "CompressedTensorsLinearMethod" in pw["quant_methods"]
    assert pw["quant_methods"] == nw["quant_methods"]
    assert [r["tokens"] for r in port.results] == [r["tokens"] for r in native.results]
    delta = _delta(port.results, native.results)
    print(f"{model_type} W8A8: port vs native max |Δ| = {delta:.2e}")
    assert delta <= THRESHOLD


@pytest.mark.parametrize("model_type", sorted(PER_LAYER))
def test_gptq_checkpoint_loads_natives_parameters(tmp_path, model_type):
    from porter.verify.engine import Start, run_engines

    info = committed_port(model_type)
    spec, model, prompts, ckpt, native_ckpt = tiny(info, tmp_path)
    port_q, n = gptq(ckpt, tmp_path / "gptq", model)
    native_q, _ = gptq(native_ckpt, tmp_path / "gptq-native", model)
    assert n == model.config.num_hidden_layers * PER_LAYER[model_type](model.config), n
    kw = dict(max_tokens=spec.max_new_tokens, top_logprobs=spec.top_logprobs, max_model_len=256,
              dtype="bfloat16", digests=True)
    port, native = run_engines([Start(port_q, 1), Start(native_q, 1)], prompts, port=info, **kw)
    if _refused_alike(model_type, "GPTQ", port, native):
        return
    (pw,), (nw,) = port.workers, native.workers  # written at load: there even when the forward fails
    assert pw["module"].startswith(info.package + "."), pw
    assert any("GPTQ" in m for m in pw["quant_methods"]), pw["quant_methods"]
    assert pw["quant_methods"] == nw["quant_methods"]
    # what the loader leaves to the engine, as native does: the KV-cache scales, and the expert
    # biases of the engine's 4-bit MoE method, which a GPTQ checkpoint has none of
    for key in ("not_returned", "unwritten"):
        assert set(pw[key]) == set(nw[key]), (pw[key], nw[key])
    assert pw["digests"] == nw["digests"], {
        k: (pw["digests"].get(k), nw["digests"].get(k)) for k in set(pw["digests"]) | set(nw["digests"])
        if pw["digests"].get(k) != nw["digests"].get(k)}
    packed = [k for k in pw["digests"] if "qweight" in k]
    print(f"{model_type} GPTQ ({n} projections): {len(pw['digests'])} parameters equal to native's "
          f"({len(packed)} packed 4-bit), layers {pw['quant_methods']}")
    if port.ok or native.ok:
        assert port.ok and native.ok, (port.error, native.error)
        assert [r["tokens"] for r in port.results] == [r["tokens"] for r in native.results]
        delta = _delta(port.results, native.results)
        print(f"{model_type} GPTQ forward ran: tokens equal, port vs native max |Δ| = {delta:.2e}")
        assert delta <= THRESHOLD
    else:
        assert port.error == native.error, (port.error, native.error)
        print(f"{model_type} GPTQ forward not run by this build: {port.error}")
