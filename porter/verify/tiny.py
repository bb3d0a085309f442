"""Tiny seeded Hugging Face models and their fp32 eager reference outputs.

The per-model-type knobs live in ``rules/tiny_configs.yaml``; this module only applies them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

RULES = Path(__file__).resolve().parents[2] / "rules" / "tiny_configs.yaml"


class VerifyInputError(Exception):
    """Bad input: verify cannot run (exit code 2)."""


def load_rules(path: Path = RULES) -> dict:
    return yaml.safe_load(Path(path).read_text())


@dataclass
class TinySpec:
    model_type: str
    config_kwargs: dict[str, Any]
    seed: int
    std: float
    prompt_lengths: list[int]
    prompt_seed: int
    max_new_tokens: int
    top_logprobs: int
    min_distinct_tokens: int
    cpu_head_dims: list[int] = field(default_factory=list)
    config_model_type: str = ""  # the model_type of the config class (default: model_type)
    # buffers given N(0, std) too, by the end of their name (a router's score-correction bias,
    # zeros in a fresh model, would rank nothing)
    noised_buffers: list[str] = field(default_factory=list)

    @property
    def config_type(self) -> str:
        return self.config_model_type or self.model_type


def is_config_field(cfg, name: str) -> bool:
    """NAME can be set on CFG's class: an attribute, but not a read-only property (Falcon's derived
    `head_dim`)."""
    prop = getattr(type(cfg), name, None)
    try:
        present = hasattr(cfg, name)
    except Exception:  # a per-layer attribute of a heterogeneous config (dots3_note, Gemma-4) refuses a global read
        per_layer = getattr(cfg, "per_layer_attributes", None)
        present = per_layer is None or name in per_layer
    return present and not (isinstance(prop, property) and prop.fset is None)


def layer_count_field(cfg) -> str:
    """The config field holding the layer count: `num_hidden_layers`, or what a remote-code config calls it
    when it maps nothing to that name (ChatGLM's `num_layers`; the port's shipped config maps it, PT144)."""
    from porter.config_names import LAYER_COUNT_NAMES

    if hasattr(cfg, "num_hidden_layers"):
        return "num_hidden_layers"
    return next((n for n in LAYER_COUNT_NAMES if hasattr(cfg, n)), "num_hidden_layers")


def causal_config_type(model_type: str, hf_architecture: str) -> str:
    """The model type whose config builds HF_ARCHITECTURE, when it is not MODEL_TYPE's own: the
    port of modeling_gemma3.py is model type gemma3, but its Gemma3ForCausalLM is built from
    gemma3_text's config (gemma3's is the multimodal one). "" when MODEL_TYPE's own config does.
    The auto table can map the multimodal model type itself to the text model (emu3 ->
    Emu3ForCausalLM): then the class's own config (Emu3TextConfig, model_type emu3_text_model) says."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal

    if causal.get(model_type) == hf_architecture:
        cfg = getattr(getattr(transformers, hf_architecture, None), "config_class", None)
        own = getattr(cfg, "model_type", "") or ""
        return own if own and own != model_type else ""
    return next((mt for mt, cls in causal.items() if cls == hf_architecture), "")


def tiny_spec(model_type: str, rules: dict | None = None, config_model_type: str = "") -> TinySpec:
    """MODEL_TYPE keys rules/tiny_configs.yaml; CONFIG_MODEL_TYPE (default: the same) names the
    config class (a port of apertus1p5's text model takes model_type apertus1p5_text)."""
    from transformers import AutoConfig

    rules = rules or load_rules()
    models = rules.get("models", {})
    if model_type not in models:
        raise VerifyInputError(
            f"no tiny config for model_type {model_type!r} in rules/tiny_configs.yaml "
            f"(known: {', '.join(sorted(models))})"
        )
    try:
        base = AutoConfig.for_model(config_model_type or model_type)
    except Exception as e:  # unknown to this transformers
        raise VerifyInputError(f"transformers has no config class for {model_type!r}: {e}") from e
    kwargs = {k: v for k, v in rules.get("defaults", {}).items() if is_config_field(base, k)}
    kwargs.update(models[model_type].get("config") or {})
    # a release's own knobs (`releases: {"4.45.2": {config: ...}}`): the reference of a port of an
    # older release runs in that release's transformers
    import transformers

    own = (models[model_type].get("releases") or {}).get(transformers.__version__) or {}
    kwargs.update(own.get("config") or {})
    # config overrides for one run (property tests verify sampled configs): a JSON object
    kwargs.update(json.loads(os.environ.get("PORTER_TINY_OVERRIDES") or "{}"))
    p = rules["prompts"]
    init = {**rules["init"], **(models[model_type].get("init") or {})}
    return TinySpec(
        model_type=model_type,
        config_kwargs=kwargs,
        seed=int(init["seed"]),
        std=float(init["std"]),
        prompt_lengths=list(p["lengths"]),
        prompt_seed=int(p["seed"]),
        max_new_tokens=int(p["max_new_tokens"]),
        top_logprobs=int(p["top_logprobs"]),
        min_distinct_tokens=int(p["min_distinct_tokens"]),
        cpu_head_dims=list(rules.get("cpu_head_dims", [])),
        config_model_type=config_model_type,
        noised_buffers=list(init.get("buffers") or []),
    )


def build_config(spec: TinySpec):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(spec.config_type, **spec.config_kwargs)
    check_config(cfg, spec)
    return cfg


def _per_layer(cfg, name: str) -> list:
    """NAME of each layer: a config whose layers differ (transformers' `per_layer_config`, Gemma-4's
    head size and KV heads per layer type) refuses the global read; else the one value."""
    # (every config of transformers >= 5.19 has the `per_layer_config` view; only a heterogeneous one has
    # layers that differ, and the view of a remote-code config without `num_hidden_layers` cannot be read)
    if getattr(cfg, "is_heterogeneous", False):
        return [getattr(layer, name, None) for layer in cfg.per_layer_config]
    return [getattr(cfg, name, None)]


def _head_dims(cfg) -> list[int]:
    return [int(hd) if hd else cfg.hidden_size // cfg.num_attention_heads for hd in _per_layer(cfg, "head_dim")]


def check_config(cfg, spec: TinySpec) -> None:
    problems = []
    for hd in sorted(set(_head_dims(cfg))):
        if spec.cpu_head_dims and hd not in spec.cpu_head_dims:
            problems.append(f"head_dim {hd} has no CPU attention kernel ({spec.cpu_head_dims})")
    if cfg.vocab_size < 512:
        problems.append(f"vocab_size {cfg.vocab_size} < 512")
    kv = max((k for k in _per_layer(cfg, "num_key_value_heads") if k is not None), default=None)
    # (latent attention caches one latent for all heads: its kv heads count is HF's repeat factor only)
    latent = cfg.to_dict().get("kv_lora_rank") is not None  # (a per-layer attribute of a heterogeneous config: no global read)
    if kv is not None and kv >= cfg.num_attention_heads and not latent:
        problems.append(f"num_key_value_heads {kv} >= num_attention_heads: GQA not exercised")
    longest = max(spec.prompt_lengths)
    window = getattr(cfg, "sliding_window", None)
    if window is not None and window >= longest:
        problems.append(f"sliding_window {window} >= longest prompt {longest}: window unused")
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        ids = getattr(cfg, name, None)
        for i in ids if isinstance(ids, list) else [ids]:
            if i is not None and not 0 <= i < cfg.vocab_size:
                problems.append(f"{name} {i} outside the vocab")
    layers = getattr(cfg, layer_count_field(cfg))
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and len(layer_types) != layers:
        problems.append(f"layer_types has {len(layer_types)} entries for {layers}")
    if not 2 <= layers <= 4:
        problems.append(f"{layer_count_field(cfg)} {layers} not in 2..4")
    if problems:
        raise VerifyInputError(f"tiny config for {spec.model_type}: " + "; ".join(problems))


def fp32_kwargs() -> dict:
    """The keyword that asks transformers for fp32 weights: `dtype` (4.56 and later) or `torch_dtype`
    (the older releases a port of an older release is verified against)."""
    import torch
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: torch.float32}


def from_pretrained_kwargs() -> dict:
    """from_pretrained's keywords for the reference: fp32, eager attention, and use_kernels=False,
    the modeling file's own code, never a hub kernel (transformers 5.25 made kernels the default of
    from_pretrained; earlier releases default to False, and the 4.x releases before `dtype` have no
    such keyword)."""
    kwargs = {**fp32_kwargs(), "attn_implementation": "eager"}
    if "dtype" in kwargs:
        kwargs["use_kernels"] = False
    return kwargs


def build_model(spec: TinySpec, hf_architecture: str):
    """The HF model for ``hf_architecture`` with seeded N(0, std) weights, fp32, eager attention."""
    import torch
    import transformers

    cfg = build_config(spec)
    cls = getattr(transformers, hf_architecture, None)
    if cls is None:
        raise VerifyInputError(f"transformers has no class {hf_architecture}")
    cfg._attn_implementation = "eager"
    torch.manual_seed(spec.seed)
    model = cls._from_config(cfg, attn_implementation="eager", **fp32_kwargs())
    return seed_weights(model, spec)


def seed_weights(model, spec: TinySpec):
    """Every parameter N(0, std) from the spec's seed (norm weights around 1), in eval mode."""
    import torch

    model.eval()
    gen = torch.Generator().manual_seed(spec.seed)
    norm_params = set()
    for mod in model.modules():
        if "norm" in type(mod).__name__.lower():
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.nn.Parameter):
                norm_params.add(id(w))
    with torch.no_grad():
        for _name, p in model.named_parameters():  # tied parameters appear once
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * spec.std
            p.copy_(noise + 1.0 if id(p) in norm_params else noise)
        buffers = torch.Generator().manual_seed(spec.seed + 1)  # the parameters' draws unchanged
        for name, b in model.named_buffers():
            if any(name.endswith(end) for end in spec.noised_buffers):
                b.copy_(torch.randn(b.shape, generator=buffers, dtype=torch.float32) * spec.std)
    return model


def prompt_vocab(model) -> int:
    """Token ids a prompt may use: the vocabulary, or fewer when the LM head is pruned to a prefix
    of it (apertus1p5's output_vocab_size): the logprob of a prompt token the head cannot produce
    does not exist, in HF or in the engine."""
    head = model.get_output_embeddings()
    rows = getattr(head, "out_features", None) or getattr(getattr(head, "weight", None), "shape", [None])[0]
    return min(model.config.vocab_size, int(rows)) if rows else model.config.vocab_size


def make_prompts(spec: TinySpec, vocab_size: int, avoid: set[int]) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(spec.prompt_seed)
    allowed = torch.tensor([i for i in range(vocab_size) if i not in avoid])
    return [
        allowed[torch.randint(len(allowed), (n,), generator=gen)].tolist()
        for n in spec.prompt_lengths
    ]


def _special_ids(cfg) -> set[int]:
    out = set()
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        ids = getattr(cfg, name, None)
        for i in ids if isinstance(ids, list) else [ids]:
            if i is not None:
                out.add(int(i))
    return out


def hf_logprobs(model, ids: list[int]):
    """log-softmax over the vocab at every position of ``ids`` (one unpadded sequence)."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return torch.log_softmax(out.logits[0].float(), dim=-1)


def hf_reference(model, prompts: list[list[int]], spec: TinySpec) -> list[dict]:
    """Per prompt: greedy continuation, and the full logprob rows along prompt + continuation.

    Greedy decoding re-runs the whole sequence each step (no cache), so there is no cache
    or padding path in the reference.
    """
    refs = []
    for prompt in prompts:
        seq = list(prompt)
        for _ in range(spec.max_new_tokens):
            seq.append(int(hf_logprobs(model, seq)[-1].argmax()))
        refs.append({"prompt": prompt, "tokens": seq[len(prompt) :]})
    return refs


# What a config says about HF's outputs and its own bookkeeping, never about the computation. A
# newer release (5.25) serialises them into nested sub-configs, and the engine's release rejects them
# there (5.19's DbrxFFNConfig: "Found unknown kwargs={'_name_or_path': '', 'output_attentions': False}").
_OUTPUT_ONLY_KEYS = frozenset({"_name_or_path", "output_attentions", "output_hidden_states", "return_dict"})


def save_checkpoint(model, out_dir: Path, architecture: str) -> Path:
    """safetensors + config.json naming ``architecture`` (the engine must use that class)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"] = [architecture]
    cfg["torch_dtype"] = "float32"
    cfg["dtype"] = "float32"
    for key, sub in cfg.items():
        if isinstance(sub, dict) and "model_type" in sub:  # a nested sub-config (dbrx's attn_config)
            cfg[key] = {k: v for k, v in sub.items() if k not in _OUTPUT_ONLY_KEYS}
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for extra in ("generation_config.json",):
        (out_dir / extra).unlink(missing_ok=True)
    return out_dir


def with_architecture(src: Path, dst: Path, architecture: str) -> Path:
    """A second view of a checkpoint whose config.json names another architecture."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        target = dst / f.name
        if f.name == "config.json":
            cfg = json.loads(f.read_text())
            cfg["architectures"] = [architecture]
            target.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        elif not target.exists():
            target.symlink_to(f.resolve())
    return dst


def experts_routed(model, prompts: list[list[int]], router_classes: list[str]) -> dict[str, list[int]]:
    """Which experts each router of the HF model sends the prompts' tokens to.

    A forward hook on every module of the router classes (the plan names them: the modules whose
    top-k picks the experts) records the integer tensor among the router's outputs, i.e. the top-k
    expert indices. One forward per prompt, as the reference runs it. {module name: sorted experts}.
    """
    import torch

    routed: dict[str, set[int]] = {}
    hooks = []

    def record(name):
        def hook(_module, inputs, output):
            outs = output if isinstance(output, (tuple, list)) else (output,)
            ints = [t for t in outs if isinstance(t, torch.Tensor) and not t.is_floating_point()]
            # (experts handed the indices, dbrx's: a block routing with its own method, its router
            # returning logits only: the integer tensor among their inputs)
            for t in ints or [t for t in inputs if isinstance(t, torch.Tensor) and not t.is_floating_point()]:
                routed.setdefault(name, set()).update(int(i) for i in t.flatten().tolist())
            # (one module per expert in a list, `experts.3`, that an inline block calls on the rows routed
            # to it, maybe none: the expert's index, under its list, when it got any row)
            parent, _, pos = name.rpartition(".")
            if not ints and not any(isinstance(t, torch.Tensor) and not t.is_floating_point() for t in inputs) \
                    and pos.isdigit() and inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].numel():
                routed.setdefault(parent, set()).add(int(pos))
        return hook

    for name, module in model.named_modules():
        if type(module).__name__ in router_classes:
            hooks.append(module.register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            for ids in prompts:
                model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {name: sorted(experts) for name, experts in sorted(routed.items())}
