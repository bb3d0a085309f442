"""Tiny checkpoints the engine tests serve through a port and through the engine's native class:
the model type's tiny HF model as porter.verify.structure builds it, and quantized copies of its
checkpoint made here with the `compressed-tensors` package (W8A8 int8, GPTQ-packed 4-bit)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def committed_port(model_type: str, target: str = "vllm"):
    """The committed port of ``model_type`` (what `porter regen --check` keeps equal to convert's output)."""
    from porter.layout import PortInfo

    path = ROOT / "generated" / target / model_type
    info = PortInfo.load(path)
    info.path = path
    return info


def tiny(info, out: Path):
    """The port's tiny HF model as the structural check builds it (its `structure` overrides),
    its prompts, and its checkpoint written for the port (architecture: the port's class) and for
    native."""
    from porter.verify.structure import structure_model
    from porter.verify.tiny import _special_ids, make_prompts, prompt_vocab, save_checkpoint, with_architecture

    spec, model = structure_model(info.model_type, info.hf_architecture)
    prompts = make_prompts(spec, prompt_vocab(model), _special_ids(model.config))
    ckpt = save_checkpoint(model, out / "ckpt", info.architecture)
    return spec, model, prompts, ckpt, with_architecture(ckpt, out / "native-ckpt", info.hf_architecture)


def projections(model, tensors: dict) -> dict[str, bool]:
    """Checkpoint weight keys (without `.weight`) of every projection a quantization scheme
    targets -> stored transposed (GPT-2's Conv1D stores [in, out]). Read off the checkpoint, whose
    names can differ from the model's modules (transformers saves Mixtral's experts as one linear
    per expert, `block_sparse_moe.experts.N.w1`): every matrix but the embeddings and the head
    (found by their values) and a router (`gate`, `router`)."""
    import torch
    from torch import nn

    vocab = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    vocab += [model.get_output_embeddings().weight]
    conv1d = {name for name, mod in model.named_modules() if type(mod).__name__ == "Conv1D"}
    found = {}
    for key, t in tensors.items():
        name = key[: -len(".weight")]
        if (key.endswith(".weight") and t.dim() == 2
                and not any(t.shape == v.shape and torch.equal(t, v.detach()) for v in vocab)
                and name.rsplit(".", 1)[-1] not in ("gate", "router")):
            found[name] = name in conv1d
    return found


def _rewrite(ckpt: Path, out: Path, quantization_config: dict, tensors: dict) -> Path:
    """A copy of ``ckpt`` whose weights are ``tensors`` and whose config carries the quantization."""
    from safetensors.torch import save_file

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(ckpt, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    return out


def _load(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def w8a8(ckpt: Path, out: Path, model) -> tuple[Path, int]:
    """compressed-tensors W8A8 int8 (its W8A8 preset: int8 weights per output channel, symmetric;
    int8 activations per token, dynamic), every projection quantized by the package's own
    `quantize`; the head and routers stay as they are. Returns the folder and the count quantized."""
    import torch
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import quantize

    scheme = preset_name_to_scheme("W8A8", ["Linear"])
    tensors = _load(ckpt)
    targets = projections(model, tensors)
    for name, transposed in targets.items():
        w = tensors[name + ".weight"].float()
        w = w.t() if transposed else w  # [out, in]
        scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-8)
        q = quantize(w, scale, torch.zeros_like(scale, dtype=torch.int8), scheme.weights, dtype=torch.int8)
        tensors[name + ".weight"] = q.t() if transposed else q
        tensors[name + ".weight_scale"] = scale
    cfg = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head", "re:.*\\.gate$"],
                             format="int-quantized", quantization_status="compressed")
    return _rewrite(ckpt, out, cfg.model_dump(mode="json"), tensors), len(targets)


def _pack(q, axis: int):
    """Eight 4-bit values (0..15) per int32 along ``axis``, the lowest bits first (GPTQ's packing)."""
    import torch

    q = q.to(torch.int32).movedim(axis, 0)
    q = q.reshape(q.shape[0] // 8, 8, *q.shape[1:])
    packed = torch.zeros(q.shape[0], *q.shape[2:], dtype=torch.int32)
    for j in range(8):
        packed |= q[:, j] << (4 * j)
    return packed.movedim(0, axis)


def gptq(ckpt: Path, out: Path, model, group_size: int = 32) -> tuple[Path, int]:
    """GPTQ 4-bit (symmetric, groups of ``group_size`` inputs, no act-order) of every projection:
    qweight [in/8, out] and qzeros [in/group, out/8] packed int32 (zeros stored minus one, GPTQ's
    own convention), scales [in/group, out] in float16 and g_idx [in], with the config GPTQ
    checkpoints carry. The weights are rounded to the nearest level (no calibration)."""
    import torch

    tensors = _load(ckpt)
    targets = projections(model, tensors)
    for name, transposed in targets.items():
        w = tensors.pop(name + ".weight").float()
        w = w if transposed else w.t()  # [in, out]
        n_in, n_out = w.shape
        groups = w.reshape(n_in // group_size, group_size, n_out)
        scale = (groups.abs().amax(dim=1) / 7).clamp(min=1e-8)  # [in/group, out]
        q = torch.clamp(torch.round(groups / scale[:, None]) + 8, 0, 15).reshape(n_in, n_out)
        tensors[name + ".qweight"] = _pack(q, 0)
        tensors[name + ".qzeros"] = _pack(torch.full((n_in // group_size, n_out), 7), 1)
        tensors[name + ".scales"] = scale.to(torch.float16)
        tensors[name + ".g_idx"] = torch.arange(n_in, dtype=torch.int32) // group_size
    cfg = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False,
           "sym": True, "checkpoint_format": "gptq", "lm_head": False}
    return _rewrite(ckpt, out, cfg, tensors), len(targets)
