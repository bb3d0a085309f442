"""Issue 28: ports load through the engine's AutoWeightsLoader and a WeightsMapper, so checkpoints that
native ports load, the port loads, into the same tensors.

One worker subprocess per target (this file run as a script) builds each committed port and the
engine's native class in-process, writes the tiny checkpoint `porter verify` uses with what real
checkpoints add to it, and loads it into both (porter.verify.structure.compare_structure): every
parameter filled, every loaded tensor equal to native's. What is added:
- a stray `.bias` beside a bias-free linear (GPTQ exports write zeros there);
- the rotary tables older exports saved (`rotary_emb.inv_freq`);
- gpt2's canonical layout: the base model's names without `transformer.`, and the `attn.bias` /
  `attn.masked_bias` buffers older transformers saved.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# (the mixture-of-experts model first: the engine makes its expert-parallel group only when the first
# model built in a process has experts)
NATIVE = {"mixtral": "MixtralForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
          "gpt2": "GPT2LMHeadModel", "falcon": "FalconForCausalLM"}


def _with_what_real_checkpoints_add(model_type: str, src: Path, dst: Path) -> list[str]:
    """A copy of the checkpoint SRC with real exports' extra tensors and names; what was changed."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    files = sorted(dst.glob("*.safetensors"))
    tensors = {k: v for f in files for k, v in load_file(f).items()}
    for f in files:
        f.unlink()
    changed = []
    weights = [k for k in tensors if k.endswith(".weight") and tensors[k].dim() == 2 and ".experts." not in k
               and (".layers.0." in k or ".h.0." in k)]
    stray = next((k for k in weights if k[: -len("weight")] + "bias" not in tensors), None)
    if stray is not None:
        tensors[stray[: -len("weight")] + "bias"] = torch.zeros(tensors[stray].shape[0])
        changed.append(f"stray bias {stray[: -len('weight')]}bias")
    attn = next((k.rsplit(".", 2)[0] for k in tensors if ".layers.0." in k and ".self_attn." in k), None)
    if attn is not None:
        tensors[f"{attn}.rotary_emb.inv_freq"] = torch.ones(4)
        changed.append(f"{attn}.rotary_emb.inv_freq")
    if model_type == "gpt2":
        tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
        n = 16
        tensors["h.0.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
        tensors["h.0.attn.masked_bias"] = torch.tensor(-1e4)
        changed += ["canonical names (no transformer.)", "h.0.attn.bias", "h.0.attn.masked_bias"]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    return changed


def _worker(target: str, out: Path) -> None:
    import tempfile

    from porter.verify.structure import compare_structure, find_port_class, make_checkpoint

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model_type, native in NATIVE.items():
            info, cls = find_port_class(ROOT / "generated" / target / model_type)
            plain = make_checkpoint(model_type, Path(tmp) / model_type, hf_architecture=info.hf_architecture)
            real = Path(tmp) / f"{model_type}-real"
            changed = _with_what_real_checkpoints_add(model_type, plain, real)
            r = compare_structure(target, real, cls, native)
            results[model_type] = {"changed": changed, "native_class": r.native_class,
                                   "native_error": r.native_load.error if r.native_load else "not loaded",
                                   "port": r.port_load.__dict__, "params_equal": r.params_equal,
                                   "port_params": r.port_params, "tensors_equal": r.tensors_equal,
                                   "tensors_compared": r.tensors_compared, "differ": r.tensors_differ,
                                   "errors": r.errors}
    out.write_text(json.dumps(results))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    out = tmp_path_factory.mktemp("layouts") / "vllm.json"
    proc = subprocess.run([sys.executable, __file__, "vllm", str(out)], capture_output=True, text=True,
                          cwd=ROOT, timeout=1800)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.e2e
@pytest.mark.parametrize("model_type", sorted(NATIVE))
def test_a_real_checkpoints_extras_load_into_the_tensors_native_loads(loaded, model_type):
    r = loaded[model_type]
    assert r["changed"], r  # the checkpoint did carry something the tiny one lacks
    assert r["native_class"] and r["native_error"] is None, r
    assert r["errors"] == [] and r["port"]["error"] is None, r
    assert r["port"]["not_returned"] == [] and r["port"]["unwritten"] == {}, r
    assert r["params_equal"] is True, r
    assert r["tensors_equal"] is True and r["tensors_compared"] == r["port_params"] > 0, r["differ"]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(sys.argv[1], Path(sys.argv[2]))
