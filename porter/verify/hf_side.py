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
  real-*      the same questions of a real checkpoint (`verify --checkpoint DIR`, porter/verify/
              realhf.py): WORKDIR/texts.json -> real.json (prompts, greedy tokens, their text),
              then logprobs, routed, and decode (WORKDIR/decode.json -> decoded.json)
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
    from porter.verify.tiny import from_pretrained_kwargs

    model = cls.from_pretrained(work / "ckpt", config=config, **from_pretrained_kwargs())
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


def _real(args, greedy: bool):
    from porter.verify.realhf import RealHF

    texts = json.loads((Path(args.workdir) / "texts.json").read_text())
    return RealHF(Path(args.checkpoint), args.hf_architecture, texts, greedy=greedy)


def _real_reference(args) -> None:
    hf = _real(args, greedy=True)
    (Path(args.workdir) / "real.json").write_text(json.dumps({
        "prompts": hf.prompts, "refs": hf.refs, "chat": hf.chat, "eos": sorted(hf.eos_ids()),
        "texts": [hf.decode(r["tokens"]) for r in hf.refs]}))


def _real_logprobs(args) -> None:
    import torch

    work = Path(args.workdir)
    hf = _real(args, greedy=False)
    torch.save(hf.logprobs(json.loads((work / "sequences.json").read_text())), work / "rows.pt")


def _real_routed(args) -> None:
    work = Path(args.workdir)
    hf = _real(args, greedy=False)
    routers = json.loads((work / "routers.json").read_text())
    (work / "routed.json").write_text(json.dumps(hf.experts_routed(routers)))


def _real_decode(args) -> None:
    work = Path(args.workdir)
    hf = _real(args, greedy=False)
    seqs = json.loads((work / "decode.json").read_text())
    (work / "decoded.json").write_text(json.dumps([hf.decode(s) for s in seqs]))


COMMANDS = {"reference": _reference, "logprobs": _logprobs, "routed": _routed,
            "real-reference": _real_reference, "real-logprobs": _real_logprobs,
            "real-routed": _real_routed, "real-decode": _real_decode}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="porter.verify.hf_side")
    ap.add_argument("command", choices=sorted(COMMANDS))
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--model-type", default="")
    ap.add_argument("--checkpoint", default="")  # real-*: the user's checkpoint folder
    ap.add_argument("--config-model-type", default="")
    ap.add_argument("--hf-architecture", required=True)
    ap.add_argument("--architecture", default="")
    args = ap.parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except Exception as exc:  # one line for the engine side to report (verify exit 2)
        import sys

        print(f"hf_side error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
