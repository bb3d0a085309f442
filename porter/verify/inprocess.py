"""An engine (vLLM or Aphrodite) in this process, without starting it: its config objects,
distributed groups (world size 1) and model registry, by target, and a model class built under
them on the CPU, the way the engine's loader would (porter.verify.structure checks what is built).

The two engines cannot share a process: the first target set up is the only one.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TARGETS = ("vllm", "aphrodite")


class StructureInputError(Exception):
    """Bad input (no PORT.json, unknown target, port class not found): exit code 2."""


# The engine, by target: the names differ, the steps are the same.


@dataclass
class _EngineApi:
    target: str
    kwarg: str  # the model constructor's keyword: vllm_config / aphrodite_config
    ModelConfig: Any
    EngineConfig: Any
    set_current: Any
    init_distributed_environment: Any
    initialize_model_parallel: Any
    model_parallel_is_initialized: Any
    registry: Any
    configure_quant_config: Any  # hands a quantization config the model class's fused-module names


_ENGINES: dict[str, _EngineApi] = {}


def engine_api(target: str) -> _EngineApi:
    """Import the target engine's config, distributed and registry entry points (once)."""
    if target not in TARGETS:
        raise StructureInputError(f"unknown target {target!r} (known: {', '.join(TARGETS)})")
    if target in _ENGINES:
        return _ENGINES[target]
    other = [t for t in TARGETS if t != target and t in _ENGINES]
    if other:
        raise RuntimeError(f"{other[0]} is already set up in this process; use one per target")
    if target == "vllm":
        from vllm import ModelRegistry
        from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
        from vllm.distributed import parallel_state as ps
        from vllm.model_executor.model_loader.utils import configure_quant_config

        api = _EngineApi(
            "vllm",
            "vllm_config",
            ModelConfig,
            VllmConfig,
            set_current_vllm_config,
            ps.init_distributed_environment,
            ps.initialize_model_parallel,
            ps.model_parallel_is_initialized,
            ModelRegistry,
            configure_quant_config,
        )
    else:
        # The wheel is a CUDA build; on the CPU its layers look their kernels up under
        # torch.ops._C, which vLLM's CPU extension registers (the build for this CPU, chosen as
        # vLLM chooses it: porter/verify/cpu.py). Both must happen before import.
        from porter.verify.cpu import load_kernels

        os.environ.setdefault("APHRODITE_TARGET_DEVICE", "cpu")
        load_kernels()
        from aphrodite import ModelRegistry
        from aphrodite.config import AphroditeConfig, ModelConfig
        from aphrodite.config.aphrodite import set_current_aphrodite_config
        from aphrodite.distributed import parallel_state as ps
        from aphrodite.model_executor.model_loader.utils import configure_quant_config

        api = _EngineApi(
            "aphrodite",
            "aphrodite_config",
            ModelConfig,
            AphroditeConfig,
            set_current_aphrodite_config,
            ps.init_distributed_environment,
            ps.initialize_model_parallel,
            ps.model_parallel_is_initialized,
            ModelRegistry,
            configure_quant_config,
        )
    _ENGINES[target] = api
    return api


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_distributed(api: _EngineApi) -> None:
    """World size 1 over gloo on the loopback, once per process."""
    if api.model_parallel_is_initialized():
        return
    api.init_distributed_environment(
        world_size=1,
        rank=0,
        local_rank=0,
        distributed_init_method=f"tcp://127.0.0.1:{_free_port()}",
        backend="gloo",
    )
    api.initialize_model_parallel(1)


def checkpoint_architectures(checkpoint_dir: Path) -> list[str]:
    cfg = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    return list(cfg.get("architectures") or [])


def register_unknown(api: _EngineApi, checkpoint_dir: Path, cls) -> None:
    """The engine's ModelConfig rejects a config.json naming an architecture it does not know
    (a port's own name, e.g. PorterLlamaForCausalLM): register ``cls`` under such names. A name
    the engine already serves is never overridden."""
    known = set(api.registry.get_supported_archs())
    for arch in checkpoint_architectures(checkpoint_dir):
        if arch not in known and cls is not None:
            api.registry.register_model(arch, cls)


def is_quantized(checkpoint_dir: Path) -> bool:
    """The checkpoint's config carries a quantization (GPTQ, compressed-tensors, ...)."""
    return "quantization_config" in json.loads((Path(checkpoint_dir) / "config.json").read_text())


def engine_config(target: str, checkpoint_dir: Path, cls=None):
    """A fresh engine config for ``checkpoint_dir`` (one per model: attention prefixes must be
    unique within a config)."""
    api = engine_api(target)
    register_unknown(api, Path(checkpoint_dir), cls)
    # a quantized checkpoint in bfloat16: the engine's quantization methods take half dtypes only
    model_config = api.ModelConfig(
        model=str(checkpoint_dir), dtype="bfloat16" if is_quantized(checkpoint_dir) else "float32",
        skip_tokenizer_init=True,
    )
    return api.EngineConfig(model_config=model_config)


@contextlib.contextmanager
def engine_context(api: _EngineApi, config) -> Iterator[None]:
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(config.model_config.dtype)
    try:
        with api.set_current(config), torch.device("cpu"):
            _ensure_distributed(api)
            yield
    finally:
        torch.set_default_dtype(old)


def build_with_config(target: str, checkpoint_dir: Path, cls):
    api = engine_api(target)
    config = engine_config(target, checkpoint_dir, cls)
    if config.quant_config is not None:  # as the engine's loader does before it builds the model
        api.configure_quant_config(config.quant_config, cls)
    with engine_context(api, config):
        model = cls(**{api.kwarg: config})
    return model, config


def build_inprocess(target: str, checkpoint_dir: Path, cls):
    """Build ``cls`` on the CPU under the target engine's config for ``checkpoint_dir``."""
    return build_with_config(target, Path(checkpoint_dir), cls)[0]


def resolve_native(target: str, checkpoint_dir: Path, native_arch: str):
    """The engine's own class for ``native_arch``, or (None, why) when it has none.

    An architecture the engine serves through its Transformers backend has no native file to
    compare names with; one it dropped is not served at all."""
    api = engine_api(target)
    if native_arch not in api.registry.get_supported_archs():
        return None, f"{target} does not serve {native_arch}"
    config = engine_config(target, checkpoint_dir)
    cls, _arch = api.registry.resolve_model_cls([native_arch], config.model_config)
    if ".models.transformers" in cls.__module__:
        return None, f"{target} serves {native_arch} through its Transformers backend only"
    return cls, None
