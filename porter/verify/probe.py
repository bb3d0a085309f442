"""Runs inside every engine process (loaded as a vLLM general plugin by verify only).

It wraps the model loader so that, for the model the engine really builds, verify learns:
  - the class (module and name),
  - the names ``load_weights`` returned, and the parameters missing from that set,
  - the parameters (or fractions of them) that no weight loader wrote: every parameter is
    filled with NaN before loading, and checked right after ``load_weights`` returns,
  - the layers' quantization methods, and with PORTER_VERIFY_DIGESTS=1 a digest of every
    parameter as loaded (before the engine repacks quantized weights).
The record is kept on the model (read back with ``LLM.apply_model(describe_model)``) and also
written to ``$PORTER_VERIFY_PROBE_DIR/load-<pid>.json`` so it survives a failed start.

With PORTER_VERIFY_AUX=1, the first forward of a model that returns EAGLE-3's auxiliary hidden
states beside its own (an EAGLE-3 target, under `speculative_config`) saves them, with the token
ids it ran on, to ``$PORTER_VERIFY_PROBE_DIR/aux-rank<r>.pt`` (what the draft was handed).
"""

from __future__ import annotations

import json
import os

_ATTR = "_porter_verify_load"


def _rank() -> int:
    try:
        import torch.distributed as dist

        return dist.get_rank() if dist.is_initialized() else 0
    except Exception:
        return 0


def _inspect(model, returned) -> dict:
    import torch

    record: dict = {
        "module": type(model).__module__,
        "name": type(model).__qualname__,
        "rank": _rank(),
        "returned_none": returned is None,
        "not_returned": [],
        "unwritten": {},
    }
    params = dict(model.named_parameters())
    if returned is not None:
        record["not_returned"] = sorted(set(params) - set(returned))
    for name, p in params.items():
        if p.is_floating_point() and p.numel():
            nan = torch.isnan(p.data).sum().item()
            if nan:
                record["unwritten"][name] = round(nan / p.numel(), 4)
    record["quant_methods"] = _quant_methods(model)
    if os.environ.get("PORTER_VERIFY_DIGESTS") == "1":
        import hashlib

        record["digests"] = {
            name: f"{p.dtype}{list(p.shape)}:" + hashlib.sha1(
                p.data.detach().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
            for name, p in params.items()}
    return record


def _quant_methods(model) -> list[str]:
    """How the layers compute: the quantization methods of the layers that have one (a quantized
    checkpoint's linear method, or the unquantized one)."""
    return sorted({type(mod.quant_method).__name__ for mod in model.modules()
                   if getattr(mod, "quant_method", None) is not None})


def _write(record: dict) -> None:
    out = os.environ.get("PORTER_VERIFY_PROBE_DIR")
    if out:
        path = os.path.join(out, f"load-{os.getpid()}.json")
        with open(path, "w") as f:
            json.dump(record, f)


def register() -> None:
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    if getattr(DefaultModelLoader.load_weights, "_porter_probe", False):
        return
    original = DefaultModelLoader.load_weights

    def load_weights(self, model, model_config):
        import torch

        with torch.no_grad():
            for p in model.parameters():
                if p.is_floating_point():
                    p.data.fill_(float("nan"))
        inner = model.load_weights
        state: dict = {}

        def recording(weights):
            returned = inner(weights)
            state["record"] = _inspect(model, returned)
            _write(state["record"])
            return returned

        model.load_weights = recording
        try:
            return original(self, model, model_config)
        finally:
            del model.load_weights
            setattr(model, _ATTR, state.get("record"))
            if os.environ.get("PORTER_VERIFY_AUX") == "1":
                _save_first_aux(model)

    load_weights._porter_probe = True
    DefaultModelLoader.load_weights = load_weights


def _save_first_aux(model) -> None:
    import torch

    def hook(module, args, kwargs, output):
        out = os.environ.get("PORTER_VERIFY_PROBE_DIR")
        if not out or not (isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], list)):
            return None
        handle.remove()  # the first such forward only: the later ones run unhooked
        ids = kwargs.get("input_ids", args[0] if args else None)
        torch.save({"input_ids": None if ids is None else ids.detach().cpu(),
                    "aux": [t.detach().float().cpu() for t in output[1]]},
                   os.path.join(out, f"aux-rank{_rank()}.pt"))
        return None

    handle = model.register_forward_hook(hook, with_kwargs=True)


def describe_model(model) -> dict:
    """For ``LLM.apply_model``: the class that serves, and the load record."""
    record = dict(getattr(model, _ATTR, None) or {})
    record["module"] = type(model).__module__
    record["name"] = type(model).__qualname__
    record["rank"] = _rank()
    from vllm.distributed import get_pp_group

    if get_pp_group().world_size > 1:  # the layers this pipeline stage holds
        held = next(((mod.start_layer, mod.end_layer) for mod in model.modules() if hasattr(mod, "end_layer")), None)
        record["pp_stage"] = [get_pp_group().rank_in_group, held]
    return record
