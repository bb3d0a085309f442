"""The bench checkpoint: one ~100M-parameter model per model type (random fp32 weights from the
model's own init), built with the installed transformers and saved once in the bench cache."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CACHE = Path(os.environ.get("PORTER_BENCH_CACHE", Path.home() / ".cache" / "porter-bench"))

# ~100M parameters (GPT-2-small / OPT-125m shape): set on a config class only where it has the
# attribute; BENCH_OVERRIDES adds per-architecture knobs.
BENCH_CONFIG = {
    "vocab_size": 32000,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "intermediate_size": 2048,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": None,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
BENCH_OVERRIDES: dict[str, dict] = {
    "opt": {
        "ffn_dim": 3072,
        "word_embed_proj_dim": 768,
        "do_layer_norm_before": True,
        "tie_word_embeddings": True,
        "pad_token_id": 1,
        "bos_token_id": 2,
        "eos_token_id": 2,
    },
}


def bench_config(model_type: str):
    from transformers import AutoConfig

    base = AutoConfig.for_model(model_type)
    kwargs = {k: v for k, v in BENCH_CONFIG.items() if hasattr(base, k)}
    kwargs.update(BENCH_OVERRIDES.get(model_type, {}))
    return AutoConfig.for_model(model_type, **kwargs)


def checkpoint(model_type: str, hf_architecture: str, log=print) -> tuple[Path, int]:
    """The bench checkpoint (HF architecture in config.json), built and saved once per config."""
    import transformers

    cfg = bench_config(model_type)
    key = hashlib.sha256(
        (cfg.to_json_string(use_diff=False) + hf_architecture + transformers.__version__).encode()
    ).hexdigest()[:12]
    out = CACHE / f"{model_type}-{key}"
    if (out / "model.safetensors").exists() and (out / "params.json").exists():
        return out, json.loads((out / "params.json").read_text())["params"]
    import torch

    from porter.verify.tiny import save_checkpoint

    log(f"building the {model_type} bench checkpoint in {out}")
    torch.manual_seed(0)
    cls = getattr(transformers, hf_architecture)
    model = cls._from_config(cfg, dtype=torch.float32)  # the model's own init (std ~0.02)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    tmp = out.with_name(out.name + ".tmp")
    save_checkpoint(model, tmp, hf_architecture)
    (tmp / "params.json").write_text(json.dumps({"params": params}))
    tmp.rename(out)
    return out, params


def special_ids(cfg) -> set[int]:
    from porter.verify.tiny import _special_ids as ids

    return ids(cfg)
