"""Phase 2 — plan: decide what the port is, once (the data: porter/plan/model.py).

`build_plan` finds the causal LM and the classes it reaches, classifies them (norms the engine
has, rotary modules, attentions, MLPs, mixture-of-experts blocks), gives every linear its
tensor-parallel role, reads the checkpoint's names (renamings, expert names) and the
architecture the port registers, derives the facts the passes read, and seals the plan. What it
cannot port it refuses (porter/plan/refusals.py). Nothing changes the plan after this.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

import libcst as cst
import libcst.matchers as m

from porter.analysis.checkpoint_names import module_renamings, split_qkv_renamings, weight_renamings
from porter.analysis.ssm import checkpoint_renames as ssm_checkpoint_renames
from porter.analysis.ssm import find_mamba2_mixers
from porter.analysis.config_source import causal_lm_model_type, config_class_for_type, config_default
from porter.analysis.cstutil import code, dotted, findall, resolve_cross_attention, self_attr
from porter.analysis.dataflow import ATTN, forward_flow
from porter.analysis.holders import holders
from porter.analysis.index import EMBEDDING_NAMES, ClassInfo, ModelIndex, is_transposed_linear
from porter.analysis.layouts import alibi_condition, attention_call_names
from porter.plan.alibi_slopes import check_alibi_max_bias
from porter.analysis.normalized_head import normalized_head
from porter.analysis.moe import find_moe_blocks, moe_checkpoint_names
from porter.analysis.moe_flat import find_flat_blocks
from porter.analysis.moe_inline import find_inline_blocks
from porter.analysis.latent_attention import latent_attention
from porter.analysis.position_axes import hands_copied_axes
from porter.analysis.rope_order import recomposed_in_order, rows_move_freely, table_order
from porter.layout import port_architecture
from porter.analysis.value_from_key import value_from_key
from porter.plan import head_pair_refusals, linear_list_refusals, latent_refusals, refusals, routed_heads, score_bias_refusals
from porter.plan.mask_bias import mask_bias
from porter.plan.attention import AttentionPlanning
from porter.plan.facts import derive
from porter.plan.model import LinearPlan, PortPlan, seal
from porter.rules_data import StripTable

if TYPE_CHECKING:
    from porter.source import Source


class Planner(AttentionPlanning):
    def __init__(self, idx: ModelIndex, table: StripTable, model_type: str, source: str) -> None:
        self.idx = idx
        self.table = table
        self.model_type = model_type
        self.source = source

    # -- discovery -------------------------------------------------------------------------
    def causal_lm(self) -> ClassInfo:
        named = getattr(self, "named_causal_lm", "")  # remote code: config.json's auto_map names it
        if named in self.idx.classes:
            return self.idx.classes[named]
        found = [c for n, c in self.idx.classes.items() if n.endswith("ForCausalLM")]
        if not found:  # the older naming (GPT2LMHeadModel), registered as the causal LM of its type
            found = [c for n, c in self.idx.classes.items() if n.endswith("LMHeadModel")]
        if not found:
            raise refusals.NO_CAUSAL_LM.error(self, None, "module")
        if len(found) > 1:
            raise refusals.TWO_CAUSAL_LMS.error(self, found[1].node, f"class {found[1].name}",
                                                names=", ".join(c.name for c in found))
        return found[0]

    def reachable(self, root: ClassInfo, stop: frozenset[str] = frozenset()) -> list[str]:
        """The file classes ROOT builds, directly or through others (not through those in STOP)."""
        seen: list[str] = []
        todo = [root.name]
        while todo:
            name = todo.pop()
            if name in seen or name not in self.idx.classes or name in stop:
                continue
            seen.append(name)
            info = self.idx.classes[name]
            todo.extend(s.ctor for s in info.submodules.values() if s.ctor in self.idx.classes)
            init = info.method("__init__")
            # a module chosen by a branch (`if moe_layer: self.mlp = Moe(c) else: self.mlp = Mlp(c)`)
            todo.extend(n for c in (findall(init, m.Call(func=m.Name())) if init else [])
                        if (n := c.func.value) in self.idx.classes)  # type: ignore[attr-defined]
            # ... or picked into a local first (`cls = BambaMLP if n == 1 else None`, then `cls(config)`)
            todo.extend(n for e in (findall(init, m.IfExp()) if init else []) for b in (e.body, e.orelse)  # type: ignore[attr-defined]
                        if isinstance(b, cst.Name) and (n := b.value) in self.idx.classes)
            todo.extend(b for b in info.bases if b in self.idx.classes and not b.endswith("PreTrainedModel"))
        order = list(self.idx.classes)
        return sorted(seen, key=order.index)

    def is_rmsnorm(self, info: ClassInfo) -> str | None:
        fwd = info.method("forward")
        if fwd is None:
            return None
        # with the methods of its own it calls (Gemma's `output = self._norm(x.float())`)
        helpers = [h for c in findall(fwd, m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name())))
                   if (h := info.method(c.func.attr.value)) is not None]  # type: ignore[attr-defined]
        parts = [fwd, *helpers]
        text = "\n".join(code(p) for p in parts)
        if "rsqrt" not in text or "pow(2)" not in text:
            return None
        if any(findall(p, m.BinaryOperation(operator=m.Subtract())) for p in parts):
            return None  # mean-centred: a LayerNorm written by hand, kept as the HF class
        init = info.method("__init__")
        if init is not None and all(isinstance(p.default, cst.Float) for p in init.params.params[1:]):
            return None  # no width to build it with (NanoChat's weightless `__init__(self, eps=1e-6)`): the HF class
        if findall(fwd, m.BinaryOperation(left=m.Float() | m.Integer(), operator=m.Add())):
            return "GemmaRMSNorm"
        return "RMSNorm"

    def holds_projections(self, cls: str, seen: frozenset[str] = frozenset()) -> bool:
        """A file class that builds linears (itself or through its sub-modules)."""
        info = self.idx.classes.get(cls)
        if info is None or cls in seen:
            return False
        return bool(info.linears()) or any(
            self.holds_projections(s.ctor, seen | {cls}) for s in info.submodules.values())

    def is_rotary(self, info: ClassInfo) -> bool:
        init = info.method("__init__")
        if init is None or info.method("forward") is None:
            return False
        # inverse frequencies, or a sinusoidal table it gathers sin/cos from (GPT-J in transformers 5.24;
        # in 5.19 the attention itself builds the table)
        return "inv_freq" in code(init) or (self.sinusoid_theta(info) is not None
                                            and not self.holds_projections(info.name))

    @cached_property
    def _attention_call_names(self) -> frozenset[str]:
        return frozenset(attention_call_names(self.idx))

    def attention_call_names(self) -> set[str]:
        return set(self._attention_call_names)

    # -- planning --------------------------------------------------------------------------
    def build(self, partial: bool = False, origin: Source | None = None) -> PortPlan:
        """The plan for the file's causal LM, finished and sealed. `partial` plans every class of a
        snippet (rule examples); `origin` (the resolved source) gives the checkpoint's names and
        the architecture of a config-only model type."""
        self.named_causal_lm = origin.causal_lm if origin is not None else ""
        if partial and not any(n.endswith("ForCausalLM") for n in self.idx.classes):
            ssm = find_mamba2_mixers(self.idx, list(self.idx.classes))
            plan = self.draft(None, [c for c in self.idx.classes if c not in {p.cls for p in ssm}], partial)
        else:
            lm = self.causal_lm()
            ssm = find_mamba2_mixers(self.idx, self.reachable(lm))
            classes = self.reachable(lm, stop=frozenset(p.cls for p in ssm))  # the engine's layer replaces each mixer
            refusals.recurrent_state(self, lm, classes, mapped=bool(ssm))
            plan = self.draft(lm, classes, partial)
        plan.ssm = ssm
        if origin is not None:
            self.checkpoint_names(plan, origin)
            self.unfused_activations(plan, origin)
        derive(plan, self.idx, self.table)
        return seal(plan)

    def draft(self, lm: ClassInfo | None, classes: list[str], partial: bool) -> PortPlan:
        """The plan of CLASSES (those LM reaches), before the checkpoint's names."""
        base = None
        if lm is not None:
            lm_sub = [s for s in lm.submodules.values() if s.ctor in self.idx.classes]
            if not lm_sub:
                raise refusals.NO_BASE_MODEL.error(self, lm.node, f"class {lm.name}")
            base = lm_sub[0]
        plan = PortPlan(
            model_type=self.model_type,
            source=self.source,
            causal_lm=lm.name if lm else "",
            architecture=port_architecture(lm.name) if lm else "",
            base_attr=base.attr if base else "",
            embed_path="",
            lm_head=None,
            tie_condition="config.tie_word_embeddings",
            classes=classes,
            top_classes=[base.ctor] if base else [],
        )
        refusals.table_chosen_classes(self, classes)
        self.classify(plan, classes, lm)
        if lm is not None:
            latent_refusals.latent_model_type(self, plan)
            # an indexer whose top-k is every key within the bound the port checks at load: not built
            unbuilt = {a.indexer_cls for a in plan.latent_arounds.values() if a.indexer_cls}
            classes = [c for c in classes if c not in unbuilt]
            plan.linears = [lp for lp in plan.linears if lp.cls not in unbuilt]
        self.rope_orders(plan)
        refusals.rearranged_rope(self, plan)
        kept = [c for c in classes if c not in plan.norms and c not in plan.rotary_classes]
        # beside an attention the engine runs (with none mapped, the KV cache update is the
        # attention's own, and unmapped_attention below names what keeps it from the engine)
        if plan.attentions:
            refusals.own_cache_state(self, plan, kept)
        plan.moes = find_moe_blocks(self.idx, classes)
        plan.moes += find_flat_blocks(self.idx, classes, plan.moes)
        plan.moes += find_inline_blocks(self.idx, classes, plan.moes)
        refusals.stray_experts(self, classes, plan.moes)
        # an inline block's own router projection becomes the GateLinear (PT100), not a sharded linear
        gates = {(p.cls, p.router) for p in plan.moes if p.inline}
        plan.linears = [lp for lp in plan.linears if (lp.cls, lp.attr) not in gates]
        fused = {c for p in plan.moes for c in (p.router_cls, p.experts_cls, *p.flat[1:2])  # become FusedMoE / GateLinear
                 if not ((p.routing_function or p.route_method) and c == p.router_cls)}  # (or a router kept)
        if plan.lm_head_normalized:  # the engine's ParallelLMHead replaces it (rows normalised when loading)
            fused.add(lm.submodules[plan.lm_head].ctor)  # type: ignore[union-attr]
        plan.classes = [c for c in classes if c not in plan.norms and c not in plan.rotary_classes and c not in fused]
        if lm is not None and not plan.attentions and not plan.latent_attentions and not partial:
            # (a decoder with no attention at all, a recurrent one, is not refused here)
            score_bias_refusals.score_position_bias(self, plan.classes)  # (names the bias before the softmax)
            refusals.unmapped_attention(self, plan.classes)
        if lm is not None:
            plan.embed_path = self.embed_path(plan, lm)
        self.weights(plan)
        return plan

    def rope_orders(self, plan: PortPlan) -> None:
        """The order of a rotary table that is the standard one rearranged (PT244), set on every
        attention that rotates, when each is admitted: q and k go from their projections to the
        rotation and the attention through nothing that reads a head's channels one by one."""
        rotating = [a for a in plan.attentions if a.rope]
        if len(plan.rotary_classes) != 1 or not rotating:
            return
        rotary = self.idx.classes[plan.rotary_classes[0]]
        keyed = findall(rotary.node, m.Subscript(value=m.Attribute(attr=m.Name("rope_parameters")),
                                                 slice=[m.SubscriptElement(m.Index(m.Name()))]))
        orders = {}
        for a in rotating:
            # the layer's table, as engine-rope (PT020) and per-layer-rope (PT240) build it
            params = a.rope_params or ("config.rope_parameters[config.layer_types[layer_idx]]" if keyed
                                       else "config.rope_parameters")
            order = table_order(rotary, params, "half")  # (PT244's helper takes half)
            # M-RoPE sections put back in order: the rotary copies one row of positions to every
            # axis, or the model hands it the positions on every axis (transformers 5.17/5.18)
            if order is None or not recomposed_in_order(rotary, hands_copied_axes(self.idx, rotary)) \
                    or not rows_move_freely(self.idx.classes[a.cls], {a.q, a.k, a.v, a.o or ""}):
                return
            orders[a.cls] = "\n".join(order)
        for a in rotating:
            a.rope_order = orders[a.cls]

    def classify(self, plan: PortPlan, classes: list[str], lm: ClassInfo | None) -> None:
        """Norms the engine has, rotary modules (both replaced), and the plan of every other class."""
        for name in classes:
            info = self.idx.classes[name]
            kind = self.is_rmsnorm(info)
            if kind:
                plan.norms[name] = kind
                continue
            if self.is_rotary(info):
                plan.rotary_classes.append(name)
                continue
            if (latent := latent_attention(self.idx, info)) is not None:
                plan.latent_attentions.append(latent)  # the engine's MLA layer builds its projections (PT280)
                continue
            latent_refusals.latent_kv_without_mla(self, info)
            self.plan_class(plan, info, is_lm=(lm is not None and name == lm.name))

    def weights(self, plan: PortPlan) -> None:
        """What loading reads from the plan: ALiBi tests, stacked (fused) parameters, transposed linears."""
        for a in plan.attentions:
            if a.alibi:
                a.alibi_when = alibi_condition(self.idx, plan.classes, a.alibi)
                check_alibi_max_bias(self, plan.classes, a.alibi)
        mask_bias(self, plan, plan.classes)  # type: ignore[arg-type]
        for a in plan.attentions:
            if a.packed:
                continue  # fused in the checkpoint too: QKVParallelLinear splits it when loading
            plan.stacked_params += [("qkv_proj", a.q, "q"), ("qkv_proj", a.k, "k"), ("qkv_proj", a.v, "v")]
        for la in plan.latent_attentions:
            if la.q_a and self.model_type not in self.table.latent_decompressed_model_types:
                # the low-rank query and the KV latent: one replicated projection in the engine's MLA layer
                plan.stacked_params += [("fused_qkv_a_proj", la.q_a, "0"), ("fused_qkv_a_proj", la.kv_a, "1")]
        experts = frozenset((moe.cls, moe.experts) for moe in plan.moes)
        for g in plan.gate_ups:
            if experts and holders(self.idx, g.cls, experts) == [] and holders(self.idx, g.cls) != []:
                continue  # built only as the experts the fused MoE layer loads (Mixtral's w1/w3 before 5.0)
            plan.stacked_params += [("gate_up_proj", g.gate, "0"), ("gate_up_proj", g.up, "1")]
        plan.stacked_params = list(dict.fromkeys(plan.stacked_params))
        plan.transposed_linears = sorted({a for c in plan.classes for a in self.transposed_linears(self.idx.classes[c])})
        plan.cross_attention_modules = sorted({f"{c}.{a}" for c in plan.classes
                                              for a in self.cross_attention_modules(self.idx.classes[c])})

    def checkpoint_names(self, plan: PortPlan, origin: Source) -> None:
        """Modules saved under another name (`.block_sparse_moe.` on disk, `.mlp.` in memory) keep
        the checkpoint's name in the port (what the engine's native port calls them too); experts'
        names as saved; and a config-only model type (exaone builds LlamaForCausalLM) registered
        under its own name, so it never collides with the port of the family it borrows from."""
        root = origin.path.resolve().parents[2] if origin.rel_path.startswith("models/") else None
        keys = [origin.model_type, plan.causal_lm]
        if (text := causal_lm_model_type(origin, plan.causal_lm)) and text not in keys:
            keys.append(text)  # the text model of a multimodal family (aria_text) is saved under its own type
        # transformers also keys its conversions by a module's class (5.25: "Dots3NoteTextModel" -> qwen2_moe's experts)
        keys += [c for c in plan.top_classes if c not in keys]
        plan.module_renames, plan.checkpoint_renames = module_renamings(weight_renamings(root, keys))
        # q, k, v stored as one tensor transformers splits when loading: the packed projection loads it whole
        for a in plan.attentions:
            if not a.packed:
                plan.checkpoint_renames += [r for r in split_qkv_renamings(root, keys, a.q, a.k, a.v, "qkv_proj")
                                            if r not in plan.checkpoint_renames]
        # `.mixer.A_log` -> the engine layer's `.mixer.A` (its loader stores -exp of it)
        plan.checkpoint_renames = [*plan.checkpoint_renames, *ssm_checkpoint_renames(plan.ssm)]
        if plan.moes:
            plan.moes, renames = moe_checkpoint_names(plan.moes, root, keys)
            plan.checkpoint_renames = [*plan.checkpoint_renames, *renames]
        own = config_class_for_type(origin)
        if own is not None:
            plan.architecture = port_architecture(own.removesuffix("Config") + "ForCausalLM")

    def unfused_activations(self, plan: PortPlan, origin: Source) -> None:
        """A gated MLP's `ACT2FN[config.X]` whose config defaults X to an activation the engine has no
        act-and-mul kernel for (BitNet's relu2): the activation and the multiply stay apart (PT243)."""
        keys = {k.attr.value for c in plan.classes if (init := self.idx.classes[c].method("__init__")) is not None
                for node in findall(init, m.Subscript(value=m.Name("ACT2FN")))
                if m.matches(k := node.slice[0].slice.value, m.Attribute(value=m.Name("config"), attr=m.Name()))}  # type: ignore[attr-defined]
        plan.unfusable_activations = frozenset(
            k for k in keys if (d := config_default(origin, plan.causal_lm, k)) is not None
            and d.lower() not in self.table.engine_act_and_mul)
        for g in plan.gate_ups:
            init = self.idx.classes[g.cls].method("__init__")
            for node in findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self"), attr=m.Name(
                    g.act)))], value=m.Subscript(value=m.Name("ACT2FN")))) if init else []:
                key = node.value.slice[0].slice.value  # type: ignore[attr-defined]
                attr = key.attr.value if m.matches(key, m.Attribute(value=m.Name("config"))) else None
                default = config_default(origin, plan.causal_lm, attr) if attr else None
                if default is not None and default.lower() not in self.table.engine_act_and_mul:
                    g.unfused = True

    def transposed_linears(self, info: ClassInfo) -> set[str]:
        """Attributes `__init__` binds to a transposed-convention linear (Conv1D), outside any
        cross-attention arm."""
        init = resolve_cross_attention(info.method("__init__"), self.table.cross_attention_flags)
        out = set()
        for node in findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))],
                                           value=m.Call())) if init else []:
            if is_transposed_linear(self.idx.qualify(dotted(node.value.func))):  # type: ignore[attr-defined]
                out.add(self_attr(node.targets[0].target))  # type: ignore[attr-defined]
        return out

    def cross_attention_modules(self, info: ClassInfo) -> set[str]:
        """Sub-modules the class's methods call only in a cross-attention arm (TrOCR's decoder layer
        builds `encoder_attn` when `config.is_decoder`, and runs it only with `encoder_hidden_states`,
        which a causal LM never gets): read before those arms are resolved, not after."""
        flags = self.table.cross_attention_flags
        out = set()
        init = resolve_cross_attention(info.method("__init__"), flags)  # (a build under a flag goes already)
        methods = [f for f in info.node.body.body if isinstance(f, cst.FunctionDef) and f.name.value != "__init__"]
        for attr in info.submodules:
            reads = m.Attribute(value=m.Name("self"), attr=m.Name(attr))
            if init is not None and findall(init, reads) and any(findall(f, reads) for f in methods) and not any(
                    findall(resolve_cross_attention(f, flags), reads) for f in methods):
                out.add(attr)
        return out

    def embed_path(self, plan: PortPlan, lm: ClassInfo) -> str:
        # Walk from the causal LM down the submodule tree to the vocab embedding.
        def walk(cls: str, path: str) -> str | None:
            info = self.idx.classes[cls]
            for attr, sub in info.submodules.items():
                if f"{cls}.{attr}" in plan.vocab_embeddings:
                    return f"{path}{attr}"
                if sub.ctor in self.idx.classes and not sub.in_list:
                    found = walk(sub.ctor, f"{path}{attr}.")
                    if found:
                        return found
            return None

        found = walk(lm.name, "")
        if not found:
            raise refusals.NO_EMBEDDING.error(self, lm.node, f"class {lm.name}")
        return found

    # -- one class -------------------------------------------------------------------------
    def plan_class(self, plan: PortPlan, info: ClassInfo, is_lm: bool) -> None:
        self.plan_embeddings(plan, info)
        linears = info.linears()
        if is_lm and not linears:  # a head of the file normalising its rows (Baichuan2's NormHead)
            for attr, sub in info.submodules.items():
                if sub.ctor in self.idx.classes and normalized_head(self.idx.classes[sub.ctor]):
                    plan.lm_head, plan.lm_head_normalized = attr, True
                    plan.linears.append(LinearPlan(info.name, attr, "lm_head", sub.line))
                    return
        if not linears:
            return
        linear_list_refusals.linear_list(self, info, linears)
        if is_lm:
            for attr, sub in linears.items():
                plan.lm_head = attr
                plan.linears.append(LinearPlan(info.name, attr, "lm_head", sub.line))
            return
        # (what self-attention runs: an `if` on a cross-attention flag keeps its false arm, BioGPT)
        fwd = resolve_cross_attention(info.method("forward"), self.table.cross_attention_flags)
        if fwd is None:
            return
        attn_names = self.attention_call_names()

        def is_attn_call(call: cst.Call) -> bool:
            return dotted(call.func) in attn_names

        opaque = {a for a, sub in info.submodules.items() if self.holds_projections(sub.ctor)}
        flow = forward_flow(fwd, set(info.submodules), is_attn_call, self.table.strip_params, set(linears), opaque)
        lin = set(linears)
        roles: dict[str, str] = {}
        if flow.attention_calls:
            refusals.unmapped_attention_op(self, info, fwd, flow, lin | opaque)
            head_pair_refusals.head_pairs(self, info, fwd)
            self.plan_attention(plan, info, flow, lin, roles)
        for attr in sorted(lin - set(roles)):
            if flow.module_inputs.get(attr, set()) & (lin | {ATTN}):
                roles[attr] = "row"
        for attr in sorted(lin - set(roles)):
            feeds_row = any(attr in flow.module_inputs.get(r, set()) for r, k in roles.items() if k == "row")
            roles[attr] = "column" if feeds_row else "replicated"
            if feeds_row and (n := self.merged_outputs(fwd, attr, info)):
                roles[attr] = f"merged:{n}"
        plan.gathered_norms += [(info.name, norm, row) for norm, row in refusals.sharded_norm(self, info, flow, roles)]
        for attr, role in roles.items():
            if role != "qkv":
                plan.linears.append(LinearPlan(info.name, attr, role, linears[attr].line))
        gu = self.gate_up_pattern(info, fwd, roles)
        if gu:
            plan.gate_ups.append(gu)

    def plan_embeddings(self, plan: PortPlan, info: ClassInfo) -> None:
        """The vocab embeddings INFO builds (nn.Embedding of the vocab size, or a subclass of it)."""
        for attr, sub in info.submodules.items():
            first = code(sub.call.args[0].value) if sub.call.args else ""
            if "vocab_size" not in first:
                continue
            if sub.ctor in EMBEDDING_NAMES:
                plan.vocab_embeddings.append(f"{info.name}.{attr}")
            elif sub.ctor in self.idx.classes and any(
                    self.idx.qualify(b) in EMBEDDING_NAMES for b in self.idx.classes[sub.ctor].bases):
                # a scaled word embedding (nn.Embedding subclass) becomes a VocabParallelEmbedding subclass
                plan.vocab_embeddings.append(f"{info.name}.{attr}")
                if sub.ctor not in plan.vocab_embedding_classes:
                    plan.vocab_embedding_classes.append(sub.ctor)

    def plan_attention(self, plan: PortPlan, info: ClassInfo, flow, lin: set[str], roles: dict[str, str]) -> None:
        """The attention of INFO's forward: its q/k/v (three projections or one packed), its output
        projection, and the plan of the rest (porter/plan/attention.py)."""
        call, per_arg = flow.attention_calls[0]
        qkv: list[str] = []
        v_from_k = None
        for origins in per_arg[1:4]:
            src = sorted(origins & lin)
            if len(src) == 2 and len(qkv) == 2 and qkv[1] in src:  # v falls back to k's projection (PT292)
                v = next(s for s in src if s != qkv[1])
                if (v_from_k := value_from_key(info.method("__init__"), info.method("forward"), qkv[1], v)):  # type: ignore[arg-type]
                    src = [v]
            if len(src) != 1:  # (k/v handed in from another layer (gemma4) say so first)
                refusals.shared_kv(self, info, info.method("forward"))  # type: ignore[arg-type]
                routed_heads.routed_query(self, info, info.method("forward"), call)  # type: ignore[arg-type]
                raise refusals.QKV_NOT_FOUND.error(self, call, f"{info.name}.forward")
            qkv.append(src[0])
        packed = len(set(qkv)) == 1
        if packed:
            interleaved, grouped, blocked, sizes = self.packed_sizes(info, call, qkv)
        elif len(set(qkv)) != 3:
            raise refusals.NOT_THREE_PROJECTIONS.error(self, call, f"{info.name}.forward")
        o = next((a for a in sorted(lin) if ATTN in flow.module_inputs.get(a, set())), None)
        ap = self.attention_plan(info, call, qkv, o)
        ap.v_from_k = v_from_k
        if packed:
            ap.packed = True
            ap.interleaved = bool(interleaved)
            ap.grouped = not interleaved and grouped is not None
            ap.blocked = blocked
            if not interleaved:
                ap.interleaved_unless = self.per_head_unless(info, qkv[0])
            ap.num_heads, ap.num_kv_heads = sizes
        plan.attentions.append(ap)
        for a in qkv:
            roles[a] = "qkv"
        if o:
            roles[o] = "row"


def build_plan(idx: ModelIndex, table: StripTable, model_type: str, source: str,
               partial: bool = False, origin: Source | None = None) -> PortPlan:
    """The finished, sealed plan of a model file (porter/plan/model.py)."""
    return Planner(idx, table, model_type, source).build(partial=partial, origin=origin)
