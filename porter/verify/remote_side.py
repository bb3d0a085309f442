"""The Hugging Face side of verifying a remote-code port (issue 23): it EXECUTES the model's code.

A model repository's ``modeling_*.py`` is loaded the way transformers loads remote code
(``trust_remote_code=True``: copied into its modules cache and imported), in a subprocess of its
own, never in porter's process: under the engine's python, or under a venv of the transformers
release the code was written for (``--reference-transformers``). Files in WORKDIR carry the rest,
as in porter/verify/hf_side.py:

  reference   the tiny config (the config class's defaults, shrunk by rules/tiny_configs.yaml's
              defaults it has fields for, its model type's entry, then ``--tiny key=value``), the
              seeded model -> WORKDIR/ckpt, WORKDIR/reference.json (spec, prompts, greedy refs)
  logprobs    WORKDIR/sequences.json -> WORKDIR/rows.pt (log-softmax rows, from WORKDIR/ckpt)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

NOTICE = "verify executes the model's code"


def parse_tiny(pairs: list[str]) -> dict:
    """`--tiny key=value` (value as JSON, else the string)."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--tiny {pair!r}: expected key=value")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def remote_spec(folder: Path, overrides: dict):
    """(TinySpec, config) of the repository's config class, shrunk."""
    import transformers

    from porter.verify.tiny import TinySpec, is_config_field, layer_count_field, load_rules

    rules = load_rules()
    base = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    entry = rules.get("models", {}).get(base.model_type, {})
    alias = layer_count_field(base)  # the layer count under the name the config class uses
    kwargs = {alias if k == "num_hidden_layers" else k: v for k, v in rules.get("defaults", {}).items()
              if is_config_field(base, alias if k == "num_hidden_layers" else k)}
    kwargs.update(entry.get("config") or {})
    kwargs.update(overrides)
    init = {**rules["init"], **(entry.get("init") or {})}
    p = rules["prompts"]
    spec = TinySpec(
        model_type=base.model_type, config_kwargs=kwargs, seed=int(init["seed"]), std=float(init["std"]),
        prompt_lengths=list(p["lengths"]), prompt_seed=int(p["seed"]), max_new_tokens=int(p["max_new_tokens"]),
        top_logprobs=int(p["top_logprobs"]), min_distinct_tokens=int(p["min_distinct_tokens"]),
        cpu_head_dims=list(rules.get("cpu_head_dims", [])),
    )
    cfg = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True, **kwargs)
    return spec, cfg


def _float32(transformers, torch) -> dict:
    """from_config's dtype keyword: `dtype` since transformers 4.56, `torch_dtype` before (a
    4.x reference venv passes an unknown `dtype` on to the model's __init__)."""
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch.float32}


def _reference(args) -> None:
    import torch
    import transformers

    from porter.verify.tiny import (
        _special_ids,
        check_config,
        hf_reference,
        make_prompts,
        prompt_vocab,
        save_checkpoint,
        seed_weights,
    )

    work = Path(args.workdir)
    spec, cfg = remote_spec(Path(args.folder), json.loads(args.tiny))
    check_config(cfg, spec)
    torch.manual_seed(spec.seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, trust_remote_code=True, **_float32(transformers, torch))
    model = seed_weights(model, spec)
    prompts = make_prompts(spec, prompt_vocab(model), _special_ids(model.config))
    refs = hf_reference(model, prompts, spec)
    save_checkpoint(model, work / "ckpt", args.architecture or type(model).__name__)
    # transformers 4.x saves a model built by from_config without its code: the logprobs side
    # reloads the config through auto_map, so the folder's modules go beside the weights
    for py in Path(args.folder).glob("*.py"):
        if not (work / "ckpt" / py.name).exists():
            (work / "ckpt" / py.name).write_bytes(py.read_bytes())
    (work / "reference.json").write_text(json.dumps(
        {"spec": dataclasses.asdict(spec), "prompts": prompts, "refs": refs,
         "hf_class": type(model).__name__}))


def _logprobs(args) -> None:
    import torch
    import transformers

    from porter.verify.tiny import hf_logprobs

    from safetensors.torch import load_file

    work = Path(args.workdir)
    # built as the reference was (from_config: remote code's non-persistent buffers, a causal mask
    # or inverse frequencies, made in __init__ as it wrote them), then the checkpoint's weights;
    # from_pretrained would build on the meta device and leave such buffers unset
    cfg = transformers.AutoConfig.from_pretrained(work / "ckpt", trust_remote_code=True)
    model = transformers.AutoModelForCausalLM.from_config(cfg, trust_remote_code=True, **_float32(transformers, torch))
    state = {}
    for f in sorted((work / "ckpt").glob("*.safetensors")):
        state.update(load_file(f))
    missing = model.load_state_dict(state, strict=False).missing_keys
    tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    if set(missing) - tied:
        raise RuntimeError(f"checkpoint lacks {sorted(set(missing) - tied)[:3]}")
    if tied and missing:
        model.tie_weights()
    model.eval()
    seqs = json.loads((work / "sequences.json").read_text())
    torch.save([hf_logprobs(model, s) for s in seqs], work / "rows.pt")


class RemoteHF:
    """The reference of a remote-code port, from the repository folder, in a subprocess (the
    engine's python unless PYTHON names another release's venv)."""

    def __init__(self, folder: Path, workdir: Path, architecture: str, tiny: dict | None = None,
                 python: Path | None = None, say=print) -> None:
        self.folder, self.work = Path(folder).resolve(), Path(workdir)
        self.python = Path(python or sys.executable)
        self.work.mkdir(parents=True, exist_ok=True)
        self.args = ["--folder", str(self.folder), "--workdir", str(self.work),
                     "--architecture", architecture, "--tiny", json.dumps(tiny or {})]
        say(f"{NOTICE}: {self.folder} (trust_remote_code, in a subprocess: {self.python})")
        self._run("reference")
        data = json.loads((self.work / "reference.json").read_text())
        from porter.verify.tiny import TinySpec

        self.spec = TinySpec(**data["spec"])
        self.prompts, self.refs = data["prompts"], data["refs"]

    def _run(self, command: str) -> None:
        from porter.verify.hfref import run_side

        run_side(self.python, "remote_side", [command, *self.args],
                 f"HF side of the remote code ({self.folder}) {command}",
                 env={"HF_MODULES_CACHE": str(self.work / "hf_modules")})  # the copied remote code, per run

    def checkpoint(self, out_dir: Path, architecture: str) -> Path:
        from porter.verify.tiny import with_architecture

        ckpt = with_architecture(self.work / "ckpt", out_dir, architecture)
        # the engine reads the config with the port's registered config class, never the
        # repository's code: no auto_map pointing at it
        cfg = json.loads((ckpt / "config.json").read_text())
        if cfg.pop("auto_map", None) is not None:
            (ckpt / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        return ckpt

    def logprobs(self, seqs: list[list[int]]) -> list:
        import torch

        (self.work / "sequences.json").write_text(json.dumps(seqs))
        self._run("logprobs")
        return torch.load(self.work / "rows.pt")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="porter.verify.remote_side")
    ap.add_argument("command", choices=["reference", "logprobs"])
    ap.add_argument("--folder", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--architecture", default="")
    ap.add_argument("--tiny", default="{}")
    args = ap.parse_args(argv)
    try:
        {"reference": _reference, "logprobs": _logprobs}[args.command](args)
    except Exception as exc:  # one line for the engine side to report (verify exit 2)
        print(f"remote_side error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
