"""What the port's WeightsMapper and load_weights' filter say, from the plan and the source (PT050).

The engine's own model files load through `AutoWeightsLoader` with a `WeightsMapper`: the mapper
names each checkpoint tensor after the module that takes it (a q/k/v or gate/up shard after the
fused module, with its shard id), and the loader walks the module tree, so what the engine's
quantization methods add (KV-cache scales, GPTQ's `g_idx`, stray biases) loads as in a native port.
"""

from __future__ import annotations

import re

import libcst as cst
import libcst.matchers as m

from porter.analysis.holders import holders

# buffers that older transformers releases saved in checkpoints and no release builds any more (the
# masked-attention fill value of GPT-2 and its descendants): ignored when nothing of the port takes them
LEGACY_CHECKPOINT_BUFFERS = ("masked_bias",)


def stacked_keys(ctx) -> list[tuple[str, str, str]]:
    """(checkpoint module, fused module, shard id) of each stacked shard, as substrings of a tensor's
    name: qualified by the attribute holding the shard's class (`.mlp.gate_proj.`), so a tensor of
    another module of the same name (an expert's own gate_proj, an attention's output gate) stays."""
    plan = ctx.plan
    owners: dict[tuple[str, str, str], set[str]] = {}
    for a in plan.attentions:
        for orig, shard in ((a.q, "q"), (a.k, "k"), (a.v, "v")):
            owners.setdefault(("qkv_proj", orig, shard), set()).add(a.cls)
    for la in plan.latent_attentions:
        owners.setdefault(("fused_qkv_a_proj", la.q_a, "0"), set()).add(la.cls)
        owners.setdefault(("fused_qkv_a_proj", la.kv_a, "1"), set()).add(la.cls)
    for g in plan.gate_ups:
        owners.setdefault(("gate_up_proj", g.gate, "0"), set()).add(g.cls)
        owners.setdefault(("gate_up_proj", g.up, "1"), set()).add(g.cls)
    experts = frozenset((moe.cls, moe.experts) for moe in plan.moes)
    keys: list[tuple[str, str, str]] = []
    for fused, orig, shard in plan.stacked_params:
        shard_id = shard if shard.isdigit() else repr(shard)
        owned = sorted(owners.get((fused, orig, shard), ()))
        attrs: list[str] | None = []
        for cls in owned:
            held = holders(ctx.idx, cls, experts)
            attrs = None if held is None or attrs is None else attrs + held
        if not attrs:
            keys.append((f".{orig}.", f".{fused}.", shard_id))
        else:
            keys += [(f".{h}.{orig}.", f".{h}.{fused}.", shard_id) for h in dict.fromkeys(attrs)]
    return list(dict.fromkeys(keys))


def base_prefix(ctx) -> tuple[str, str] | None:
    """A regex matching a tensor name under none of the causal LM's own modules, and the base model's
    prefix to put before it: a checkpoint of the base model alone (GPT-2's canonical `h.0.attn...`),
    loaded as transformers loads it, under `base_model_prefix`."""
    plan = ctx.plan
    info = ctx.idx.classes.get(plan.causal_lm)
    if info is None or not plan.base_attr or "." in plan.base_attr:
        return None
    own = sorted({plan.base_attr, plan.lm_head or "lm_head", *info.submodules})
    return rf"^(?!(?:{'|'.join(re.escape(a) for a in own)})\.)", f"{plan.base_attr}."


def dropped_modules(ctx) -> list[tuple[str, str]]:
    """(regex, why) of the checkpoint's modules the port does not build."""
    plan = ctx.plan
    out = []
    cross = sorted({c.rsplit(".", 1)[1] for c in plan.cross_attention_modules})
    if cross:
        out.append((rf"(^|\.)({'|'.join(map(re.escape, cross))})\.",
                     "cross-attention the port does not build (it runs only with an encoder)"))
    indexers = sorted({a.indexer for a in plan.latent_arounds.values() if a.indexer})
    if indexers:
        out.append((rf"(^|\.)({'|'.join(map(re.escape, indexers))})\.",
                     "a sparse-attention indexer the port does not build (every key within max_model_len)"))
    return out


def ignored_suffixes(ctx) -> list[str]:
    """Name endings of checkpoint tensors that nothing of the port takes and transformers ignores too:
    the classes' `_keys_to_ignore_on_load_unexpected` that are plain names, and legacy buffers."""
    found: list[str] = []
    attr = m.Assign(targets=[m.AssignTarget(m.Name("_keys_to_ignore_on_load_unexpected"))], value=m.List())
    for info in ctx.idx.classes.values():
        for st in info.node.body.body:
            if not isinstance(st, cst.SimpleStatementLine) or not m.matches(st.body[0], attr):
                continue
            for el in st.body[0].value.elements:  # type: ignore[attr-defined]
                if isinstance(el.value, cst.SimpleString):
                    text = el.value.evaluated_value
                    if isinstance(text, str) and re.fullmatch(r"[A-Za-z0-9_.]+", text):
                        found.append(f".{text}")
    from porter.analysis.causal_buffer import causal_buffers

    if found or any(b is not None for info in ctx.idx.classes.values() for b in causal_buffers(info.node).values()):
        # a model of the GPT-2 line (a causal-mask buffer of its own): its older checkpoints carry these
        found += [f".{b}" for b in LEGACY_CHECKPOINT_BUFFERS]
    return sorted(set(found))
