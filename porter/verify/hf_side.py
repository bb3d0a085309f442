"""The Hugging Face side of a verify, run as a subprocess in another environment.

Used when the port's transformers release is not the engine's (see porter/verify/hfenv.py). It
runs under that release's python with porter on PYTHONPATH and imports only porter.verify.tiny
(torch, transformers, yaml). Everything crosses through files in WORKDIR:

  reference   builds the tiny seeded model -> WORKDIR/ckpt (config.json naming the port's
              architecture), WORKDIR/reference.json (the spec, prompts, HF greedy continuations)
  logprobs    WORKDIR/sequences.json (token id lists) -> WORKDIR/rows.pt (HF log-softmax rows
              along each sequence, from the checkpoint just written)
  routed      WORKDIR/routers.json (MoE router class names) -> WORKDIR/routed.json (the experts
              each router sends the reference prompts to, from the same checkpoint)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def _reference(args) -> None:
    from porter.verify.tiny import (
        _special_ids,
        build_model,
        hf_reference,
        make_prompts,
    prompt_vocab,
        save_checkpoint,
        tiny_spec,
    )

    work = Path(args.workdir)
    from porter.verify.tiny import causal_config_type

    # the config class that builds the causal LM, looked up in this release's auto table (gemma3's
    # Gemma3ForCausalLM takes gemma3_text's config; its own model type's config is the multimodal one)
    config_model_type = args.config_model_type or causal_config_type(args.model_type, args.hf_architecture)
    spec = tiny_spec(args.model_type, config_model_type=config_model_type)
    model = build_model(spec, args.hf_architecture)
    prompts = make_prompts(spec, prompt_vocab(model), _special_ids(model.config))
    refs = hf_reference(model, prompts, spec)
    save_checkpoint(model, work / "ckpt", args.architecture)
    (work / "reference.json").write_text(json.dumps(
        {"spec": dataclasses.asdict(spec), "prompts": prompts, "refs": refs}))


def _load(args):
    import transformers

    work = Path(args.workdir)
    cls = getattr(transformers, args.hf_architecture)
    # the checkpoint's own config class (a config-only model type such as exaone builds
    # LlamaForCausalLM from an ExaoneConfig, as transformers' auto table does)
    config = transformers.AutoConfig.from_pretrained(work / "ckpt")
    from porter.verify.tiny import fp32_kwargs

    # use_kernels=False: the modeling file's own code, never a hub kernel (transformers 5.25 made
    # kernels the default of from_pretrained; earlier releases default to False, and the 4.x
    # releases before `dtype` have no such keyword)
    kwargs = fp32_kwargs()
    if "dtype" in kwargs:
        kwargs["use_kernels"] = False
    model = cls.from_pretrained(work / "ckpt", config=config, attn_implementation="eager", **kwargs)
    model.eval()
    return model


def _logprobs(args) -> None:
    import torch

    from porter.verify.tiny import hf_logprobs

    work = Path(args.workdir)
    model = _load(args)
    seqs = json.loads((work / "sequences.json").read_text())
    torch.save([hf_logprobs(model, s) for s in seqs], work / "rows.pt")


def _routed(args) -> None:
    from porter.verify.tiny import experts_routed

    work = Path(args.workdir)
    model = _load(args)
    prompts = json.loads((work / "reference.json").read_text())["prompts"]
    routers = json.loads((work / "routers.json").read_text())
    (work / "routed.json").write_text(json.dumps(experts_routed(model, prompts, routers)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="porter.verify.hf_side")
    ap.add_argument("command", choices=["reference", "logprobs", "routed"])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--model-type", required=True)
    ap.add_argument("--config-model-type", default="")
    ap.add_argument("--hf-architecture", required=True)
    ap.add_argument("--architecture", required=True)
    args = ap.parse_args(argv)
    try:
        {"reference": _reference, "logprobs": _logprobs, "routed": _routed}[args.command](args)
    except Exception as exc:  # one line for the engine side to report (verify exit 2)
        import sys

        print(f"hf_side error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
