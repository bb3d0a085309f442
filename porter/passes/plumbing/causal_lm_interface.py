"""PT050 causal-lm-interface: the rule `CausalLmInterface`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import (
    code,
    dotted,
    find_method,
    findall,
    param_names,
    self_attr,
    self_call_attr,
)
from porter.passes.base import Example, Rule
from porter.passes.plumbing._positions import passes_through, selects_positions
from porter.analysis.layouts import linear_args
from porter.analysis.normalized_head import head_sizes
from porter.passes.plumbing import _weights_mapper as _wm
from porter.render import render

# the base model and head module of PT050's prediction-head example (before and after alike)
_HEAD_MODULES = (
    "from torch import nn\n"
    "\n"
    "\n"
    "class AModel(nn.Module):\n"
    "    def __init__(self, config):\n"
    "        super().__init__()\n"
    "        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)\n"
    "\n"
    "\n"
    "class AHead(nn.Module):\n"
    "    def __init__(self, config):\n"
    "        super().__init__()\n"
    "        self.norm = nn.LayerNorm(config.hidden_size)\n"
    "\n"
    "    def forward(self, x):\n"
    "        return self.norm(x)\n"
    "\n"
    "\n"
)

# PT050's plain example: the causal LM over a base model, its head a bias-free nn.Linear
_PLAIN = (
    "from torch import nn\n\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n"
    "        super().__init__()\n"
    "        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)\n\n\n"
    "class AForCausalLM(nn.Module):\n    def __init__(self, config):\n"
    "        super().__init__()\n        self.model = AModel(config)\n"
    "        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)\n"
    "\n    def forward(self, input_ids):\n"
    "        return self.lm_head(self.model(input_ids=input_ids))\n"
)
_PLAIN_PORT = (
    "from torch import nn\n\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n"
    "        super().__init__()\n"
    "        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)\n\n\n"
    "class AForCausalLM(nn.Module):\n"
    "    \n    \n"
    "    hf_to_vllm_mapper = WeightsMapper(\n        orig_to_new_regex={\n"
    "            # a checkpoint of the base model alone (gpt2's canonical `h.0...`): under the port's base model\n"
    "            re.compile(\"^(?!(?:lm_head|model)\\\\.)\"): \"model.\",\n        },\n    )\n"
    "    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ''):\n"
    "        super().__init__()\n        config = vllm_config.model_config.hf_config\n"
    "        cache_config = vllm_config.cache_config\n"
    "        quant_config = vllm_config.quant_config\n        self.config = config\n"
    "        self.model = AModel(config)\n"
    "        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, "
    'quant_config=quant_config, prefix=maybe_prefix(prefix, "lm_head"))\n'
    "        if config.tie_word_embeddings:\n"
    "            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)\n"
    "        self.logits_processor = LogitsProcessor(config.vocab_size)\n"
    "    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:\n"
    "        return self.model.embed_tokens(input_ids)\n    \n    \n    def forward(\n"
    "        self,\n        input_ids: torch.Tensor | None,\n"
    "        positions: torch.Tensor,\n"
    "        intermediate_tensors: IntermediateTensors | None = None,\n"
    "        inputs_embeds: torch.Tensor | None = None,\n    ) -> torch.Tensor:\n"
    "        return self.model(input_ids=input_ids, positions=positions, "
    "inputs_embeds=inputs_embeds)\n    \n    \n"
    "    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:\n"
    "        return self.logits_processor(self.lm_head, hidden_states)\n    \n    \n"
    "    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:\n"
    "        loader = AutoWeightsLoader(self)\n"
    "        return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)\n"
)


_HELPER_ARM = ("this config makes the model rewrite its own modules with {}, which the port does not "
               "run (the engine builds its layers and quantisation itself)")


def _helper_module_arm(st: cst.If, removed: set[str]) -> str | None:
    """An arm of the causal LM's __init__ that hands the model itself to a function the port does
    not have (imported from a module of the model's folder or from transformers, its import gone:
    `quantize_offline(self, 4)`): that function's name. The port cannot run it: it keeps the test
    and raises when a config takes it."""
    for c in findall(st.body, m.Call(func=m.Name())):
        if dotted(c.func) in removed and any(m.matches(a.value, m.Name("self")) for a in c.args):  # type: ignore[attr-defined]
            return dotted(c.func)  # type: ignore[attr-defined]
    return None


class CausalLmInterface(Rule):
    descend_methods = frozenset()
    reads_target = True
    code = "PT050"
    name = "causal-lm-interface"
    why = (
        "The engine builds the causal LM as `cls(vllm_config=..., prefix=...)` (keyword-only, "
        "its signature is inspected), calls `forward(input_ids, positions, intermediate_tensors, "
        "inputs_embeds)` for hidden states, `compute_logits` through a `LogitsProcessor`, "
        "`embed_input_ids`, and `load_weights` to fill parameters. lm_head becomes "
        "`ParallelLMHead` (tied to the embedding when the config says so); `load_weights` is "
        "rendered from templates/load_weights.py.j2 with the plan's stacked q/k/v and gate/up "
        "mapping, so the fused layers and their loader always agree. A scale HF applies to the "
        "logits (or to the hidden states entering a head without bias, the same thing) and a tanh "
        "soft cap become the logits processor's `scale=` and `soft_cap=`."
    )
    examples = [
        Example(
            _PLAIN,
            _PLAIN_PORT,
        ),
        Example(  # the hidden states scaled on their way into a bias-free head (MiniCPM3): the
            # same scale of the logits, which the engine's logits processor applies
            _PLAIN.replace("        return self.lm_head(self.model(input_ids=input_ids))\n",
                           "        hidden_states = self.model(input_ids=input_ids)\n"
                           "        hidden_states = hidden_states / self.config.logits_scaling\n"
                           "        return self.lm_head(hidden_states)\n"),
            _PLAIN_PORT.replace("LogitsProcessor(config.vocab_size)",
                                "LogitsProcessor(config.vocab_size, scale=(1.0 / self.config.logits_scaling))"),
        ),
        Example(  # the same after transformers 5.25's position selection helper (not a scale: the
            # engine selects the positions it samples), which must not hide the scale before it
            _PLAIN.replace("        return self.lm_head(self.model(input_ids=input_ids))\n",
                           "        hidden_states = self.model(input_ids=input_ids)\n"
                           "        hidden_states = hidden_states / self.config.logits_scaling\n"
                           "        hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)\n"
                           "        return self.lm_head(hidden_states)\n"),
            _PLAIN_PORT.replace("LogitsProcessor(config.vocab_size)",
                                "LogitsProcessor(config.vocab_size, scale=(1.0 / self.config.logits_scaling))"),
        ),
        Example(  # the scale inside the head call, in the `else` of an arm that slices the head's
            # weight (MiniCPM's remote code: `pretraining_tp > 1`, the same product in slices)
            _PLAIN.replace("        return self.lm_head(self.model(input_ids=input_ids))\n",
                           "        hidden_states = self.model(input_ids=input_ids)\n"
                           "        if self.config.pretraining_tp > 1:\n"
                           "            logits = F.linear(hidden_states, self.lm_head.weight)\n"
                           "        else:\n"
                           "            logits = self.lm_head(hidden_states / (self.config.hidden_size / self.config.dim_model_base))\n"
                           "        return logits.float()\n"),
            _PLAIN_PORT.replace("LogitsProcessor(config.vocab_size)",
                                "LogitsProcessor(config.vocab_size, scale=(1.0 / (self.config.hidden_size / "
                                "self.config.dim_model_base)))"),
        ),
        Example(  # a head module between the base model and the vocab projection (ModernBERT-decoder):
            # applied in compute_logits, per token
            _HEAD_MODULES
            + "class AForCausalLM(nn.Module):\n"
            "    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.model = AModel(config)\n"
            "        self.head = AHead(config)\n"
            "        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)\n"
            "\n"
            "    def forward(self, input_ids):\n"
            "        hidden_states = self.model(input_ids=input_ids)\n"
            "        return self.decoder(self.head(hidden_states[:, -1:, :]))\n",
            _HEAD_MODULES
            + "class AForCausalLM(nn.Module):\n"
            "    \n    \n"
            "    hf_to_vllm_mapper = WeightsMapper(\n        orig_to_new_regex={\n"
            "            # a checkpoint of the base model alone (gpt2's canonical `h.0...`): under the port's base model\n"
            "            re.compile(\"^(?!(?:decoder|head|model)\\\\.)\"): \"model.\",\n        },\n    )\n"
            "    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ''):\n"
            "        super().__init__()\n"
            "        config = vllm_config.model_config.hf_config\n"
            "        cache_config = vllm_config.cache_config\n"
            "        quant_config = vllm_config.quant_config\n"
            "        self.config = config\n"
            "        self.model = AModel(config)\n"
            "        self.head = AHead(config)\n"
            '        self.decoder = ParallelLMHead(config.vocab_size, config.hidden_size, bias=True, quant_config=quant_config, prefix=maybe_prefix(prefix, "decoder"))\n'
            "        if config.tie_word_embeddings:\n"
            "            self.decoder = self.decoder.tie_weights(self.model.embed_tokens)\n"
            "        self.logits_processor = LogitsProcessor(config.vocab_size)\n"
            "    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:\n"
            "        return self.model.embed_tokens(input_ids)\n"
            "    \n"
            "    \n"
            "    def forward(\n"
            "        self,\n"
            "        input_ids: torch.Tensor | None,\n"
            "        positions: torch.Tensor,\n"
            "        intermediate_tensors: IntermediateTensors | None = None,\n"
            "        inputs_embeds: torch.Tensor | None = None,\n"
            "    ) -> torch.Tensor:\n"
            "        return self.model(input_ids=input_ids, positions=positions, inputs_embeds=inputs_embeds)\n"
            "    \n"
            "    \n"
            "    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:\n"
            "        hidden_states = self.head(hidden_states)\n"
            "        return self.logits_processor(self.decoder, hidden_states, self.decoder.bias)\n"
            "    \n"
            "    \n"
            "    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:\n"
            "        loader = AutoWeightsLoader(self)\n"
            "        return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)\n",
        ),
    ]

    def leave_ClassDef(self, original, updated):
        super().leave_ClassDef(original, updated)
        if self.scope or updated.name.value != self.plan.causal_lm:
            return updated
        ctx, plan = self.ctx, self.plan
        t = ctx.target
        info = ctx.idx.classes[plan.causal_lm]
        base_call = self._base_call(info) or plan.base_attr
        body: list[cst.BaseStatement] = []
        if plan.stacked_params:
            packed: dict[str, list[str]] = {}
            for fused, orig, _ in plan.stacked_params:
                packed.setdefault(fused, []).append(orig)
            body.append(cst.parse_statement(f"packed_modules_mapping = {packed!r}\n"))
        for st in updated.body.body:
            if isinstance(st, cst.FunctionDef) and st.name.value == "__init__":
                body.append(self._init(st))
        lm_head_bias = False
        if plan.lm_head and plan.lm_head in info.submodules and not plan.lm_head_normalized:
            lm_head_bias = linear_args(info.submodules[plan.lm_head].call)[2] != "False"
        methods = render("causal_lm_methods.py.j2", embed_path=plan.embed_path, base_call=base_call,
                         lm_head=plan.lm_head or "lm_head", lm_head_bias=lm_head_bias,
                         base_positions=self._base_takes("positions"), base_embeds=self._base_takes("inputs_embeds"),
                         pre_head=self._pre_head(info))
        ctx.use("IntermediateTensors")
        lw = self._load_weights(lm_head_bias)
        for fn in cst.parse_module(methods + "\n\n" + lw).body:
            if isinstance(fn, cst.SimpleStatementLine):  # the WeightsMapper(s): after the packed modules mapping
                body.insert(sum(isinstance(st, cst.SimpleStatementLine) for st in body), fn)
            else:
                body.append(fn)
        self.mark(plan.causal_lm)
        del t
        return updated.with_changes(body=updated.body.with_changes(body=body))

    def _load_weights(self, lm_head_bias: bool) -> str:
        """The port's WeightsMapper, load_weights and (when it needs one) its port_weights filter."""
        ctx, plan = self.ctx, self.plan
        interleaved = sorted({f".{a.q}." for a in plan.attentions if a.interleaved})
        grouped = sorted({f".{a.q}." for a in plan.attentions if a.grouped})
        blocked = sorted({(f".{a.q}.", *a.blocked) for a in plan.attentions if a.blocked})
        interleaved_unless = sorted({(f".{a.q}.", a.interleaved_unless) for a in plan.attentions
                                     if a.interleaved_unless})
        experts = []
        for mp in plan.moes:
            e = dict(attr=mp.experts, gate_up_param=mp.gate_up, down_param=mp.down,
                     num_experts=_experts_count(mp.num_experts), bias=list(mp.expert_bias), flat=list(mp.flat))
            if mp.expert_bias:  # (gpt_oss) the swigluoai experts with biases, loaded per rank
                ctx.use("get_tensor_model_parallel_rank")
            if e not in experts:
                experts.append(e)
        flat = [e for e in experts if e["flat"]]
        packed_bias = [e for e in experts if e["bias"] and not e["flat"]]
        latent_q_lora = any(a.q_a and a.q and (a.q_lora_config or "").startswith("config.")
                            for a in plan.latent_attentions)
        own = [why for why, on in (("a linear named like a shard", _stacked_clash(ctx)),
                                   ("the KV latent projection without a low-rank query", latent_q_lora),
                                   ("a KV-sharing layer's own q_proj", any(a.kv_shared_when for a in plan.attentions)))
               if on]
        transposed = repr(tuple(f".{a}.weight" for a in plan.transposed_linears))
        # rules after this one add to the filter: their transforms of q/k (PT241, PT242) and v (PT292)
        later = any(a.rope_reversed or a.rope_order or a.v_from_k for a in plan.attentions)
        direct = bool(flat or packed_bias or own)
        filt = bool(interleaved or grouped or blocked or interleaved_unless or direct or later
                    or plan.checkpoint_renames or plan.lm_head_normalized or transposed != "()")
        ctx.use("AutoWeightsLoader")
        ctx.use("WeightsMapper")
        if own:
            ctx.use("default_weight_loader")
        return render("load_weights.py.j2", mapper_attr=f"hf_to_{ctx.target.package}_mapper",
                      stacked=_wm.stacked_keys(ctx), drops=_wm.dropped_modules(ctx), base_prefix=_wm.base_prefix(ctx),
                      renames=plan.checkpoint_renames, ignore_suffixes=_wm.ignored_suffixes(ctx), filter=filt,
                      direct=direct, own_params=", ".join(own), lm_head=plan.lm_head or "lm_head",
                      lm_head_bias=lm_head_bias, lm_head_normalized=plan.lm_head_normalized,
                      transposed=transposed, interleaved=interleaved, grouped=grouped, blocked=blocked,
                      interleaved_unless=interleaved_unless, flat=flat, packed_bias=packed_bias)

    def _logits_post(self, info) -> tuple[str | None, str | None]:
        """What HF's forward does to the logits after lm_head: a scale and/or a tanh soft cap.

        The engine applies both in its LogitsProcessor (`scale=`, `soft_cap=`); anything else
        done to the logits cannot be ported silently.
        """
        fwd = info.method("forward")
        if fwd is None or not self.plan.lm_head:
            return None, None
        lm = self.plan.lm_head
        stripped = self.ctx.table.strip_params
        stmts: list[cst.BaseSmallStatement] = []

        head_call = m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(lm)))

        def collect(block) -> None:
            for st in block:
                if isinstance(st, cst.If):
                    if not (set(n.value for n in findall(st.test, m.Name())) & stripped):  # type: ignore[attr-defined]
                        # the arm that calls lm_head (MiniCPM's `else` after a `pretraining_tp > 1` arm
                        # slicing its weight: the same product, in slices)
                        other = st.orelse.body.body if isinstance(st.orelse, cst.Else) else None
                        use_else = other is not None and not findall(st.body, head_call) and any(
                            findall(x, head_call) for x in other)
                        collect(other if use_else else st.body.body)
                elif isinstance(st, cst.SimpleStatementLine):
                    stmts.extend(st.body)

        collect(fwd.body.body)
        names: set[str] = set()
        ops: list[tuple[str, str]] = self._pre_head_scale(info, stmts)
        for small in stmts:
            if not (isinstance(small, cst.Assign) and len(small.targets) == 1
                    and isinstance(small.targets[0].target, cst.Name)):
                continue
            target, value = small.targets[0].target.value, small.value
            if findall(value, m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(lm)))):
                names.add(target)
                continue
            reads = {n.value for n in findall(value, m.Name())} & names  # type: ignore[attr-defined]
            if not reads:
                continue
            names.add(target)
            if isinstance(value, cst.BinaryOperation) and isinstance(value.operator, (cst.Multiply, cst.Divide)):
                # `logits.float() / cap`: the cast to float32 is the logits processor's own
                value = value.with_changes(left=_uncast(value.left), right=_uncast(value.right))
                left_is = m.matches(value.left, m.Name()) and value.left.value in names  # type: ignore[attr-defined]
                other = value.right if left_is else value.left
                if not ({n.value for n in findall(other, m.Name())} & names):  # type: ignore[attr-defined]
                    op = "*" if isinstance(value.operator, cst.Multiply) else "/"
                    if op == "/" and not left_is:
                        raise self._unportable(value)
                    ops.append((op, code(other)))
                    continue
            if m.matches(value, m.Call(func=m.Attribute(value=m.Name("torch"), attr=m.Name("tanh")))):
                ops.append(("tanh", ""))
                continue
            if m.matches(value, m.Call(func=m.Attribute(attr=m.Name("float") | m.Name("contiguous")), args=[])):
                continue
            raise self._unportable(value)
        soft_cap = None
        if ("tanh", "") in ops:
            i = ops.index(("tanh", ""))
            if 0 < i < len(ops) - 1 and ops[i - 1][0] == "/" and ops[i + 1] == ("*", ops[i - 1][1]):
                soft_cap = ops[i - 1][1]
                ops = ops[: i - 1] + ops[i + 2:]
            else:
                raise self._unportable(fwd)
        scale = None
        for op, expr in ops:
            simple = m.matches(cst.parse_expression(expr), m.Name() | m.Attribute() | m.Float() | m.Integer())
            inner = expr if simple else f"({expr})"
            term = inner if op == "*" else f"(1.0 / {inner})"
            scale = term if scale is None else f"{scale} * {term}"
        return scale, soft_cap

    def _pre_head(self, info) -> list[str]:
        """Modules of the causal LM the hidden states go through on their way into lm_head
        (`logits = self.decoder(self.lm_head(hidden_states[:, s, :]))`: ModernBERT-decoder's
        prediction head, dense + activation + norm, before its vocab projection `decoder`), in the
        order they apply: compute_logits applies them, per token, before the logits processor."""
        fwd = info.method("forward")
        lm = self.plan.lm_head
        if fwd is None or not lm:
            return []
        subs = {a for a, s in info.submodules.items()
                if a not in (lm, self.plan.base_attr) and "Dropout" not in (s.ctor or "")}
        if not subs:
            return []
        local = {n.targets[0].target.value: n.value  # type: ignore[attr-defined]
                 for n in findall(fwd, m.Assign(targets=[m.AssignTarget(m.Name())]))}
        for call in findall(fwd, m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(lm)))):
            chain: list[str] = []
            seen: set[str] = set()
            arg = call.args[0].value if call.args else None  # type: ignore[attr-defined]
            while arg is not None:
                if isinstance(arg, cst.Subscript):  # hidden_states[:, slice_indices, :]
                    arg = arg.value
                elif isinstance(arg, cst.Call) and arg.args and isinstance(arg.args[0].value, cst.Name) \
                        and selects_positions(arg, arg.args[0].value.value, self.ctx.table.strip_params):
                    arg = arg.args[0].value  # slice_logits_to_keep(hidden_states, logits_to_keep)
                elif isinstance(arg, cst.Name) and arg.value in local and arg.value not in seen:
                    seen.add(arg.value)
                    arg = local[arg.value]
                elif self_call_attr(arg) in subs and arg.args:  # type: ignore[union-attr]
                    chain.append(self_call_attr(arg))  # type: ignore[arg-type]
                    arg = arg.args[0].value  # type: ignore[union-attr]
                else:
                    break
            return chain[::-1]
        return []

    def _pre_head_scale(self, info, stmts: list) -> list[tuple[str, str]]:
        """A scale of the hidden states on their way into lm_head (MiniCPM3: `hidden_states =
        hidden_states / self.config.logits_scaling`, then `self.lm_head(hidden_states[:, s, :])`):
        through a head without bias, the same scale of the logits. Read back from the lm_head call
        over the assignments of the name it reads, up to the first that is not such a scale."""
        lm_call = m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(self.plan.lm_head)))
        at = next((i for i, st in enumerate(stmts) if findall(st, lm_call)), None)
        call = findall(stmts[at], lm_call)[0] if at is not None else None
        arg = call.args[0].value if call is not None and call.args else None  # type: ignore[attr-defined]
        arg = arg.value if isinstance(arg, cst.Subscript) else arg
        ops: list[tuple[str, str]] = []
        if isinstance(arg, cst.BinaryOperation) and isinstance(arg.operator, (cst.Multiply, cst.Divide)):
            # the scale inside the call (MiniCPM: `self.lm_head(hidden_states / (hidden / dim_model_base))`)
            left, other = _uncast(arg.left), arg.right
            if isinstance(arg.operator, cst.Multiply) and not isinstance(left, cst.Name):
                left, other = _uncast(arg.right), arg.left
            if isinstance(left, cst.Name) and left.value not in {n.value for n in findall(other, m.Name())}:  # type: ignore[attr-defined]
                bare = other.with_changes(lpar=[], rpar=[]) if hasattr(other, "lpar") else other
                ops.append(("/" if isinstance(arg.operator, cst.Divide) else "*", code(bare)))
                arg = left
        if at is None or not isinstance(arg, cst.Name):
            return []
        name = arg.value
        for small in reversed(stmts[:at]):
            if isinstance(small, cst.AugAssign) and m.matches(small.target, m.Name(name)):
                scaled = (small.operator, _uncast(small.target), small.value)
            elif (isinstance(small, cst.Assign) and len(small.targets) == 1
                  and m.matches(small.targets[0].target, m.Name(name))):
                v = small.value
                if passes_through(v, name, self.ctx.table.strip_params):
                    continue  # `hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)`, `.to(device)`
                if not isinstance(v, cst.BinaryOperation):
                    if name in {n.value for n in findall(v, m.Name())} and self_call_attr(v) is None:  # type: ignore[attr-defined]
                        raise self._unportable(v, "to the hidden states before")  # a step the port would drop
                    break
                scaled = (v.operator, _uncast(v.left), v.right)
            else:
                continue
            op, left, other = scaled
            div = isinstance(op, (cst.Divide, cst.DivideAssign))
            if not (isinstance(op, (cst.Multiply, cst.MultiplyAssign)) or div):
                break
            if not m.matches(left, m.Name(name)) and not div and m.matches(_uncast(other), m.Name(name)):
                left, other = other, left  # `scale * hidden_states`
            if not m.matches(left, m.Name(name)) or name in {n.value for n in findall(other, m.Name())}:  # type: ignore[attr-defined]
                break
            ops.append(("/" if div else "*", code(other)))
        head = findall(info.node, m.Assign(targets=[m.AssignTarget(
            m.Attribute(value=m.Name("self"), attr=m.Name(self.plan.lm_head)))]))
        if ops and (self._pre_head(info) or not head or linear_args(head[0].value)[2] != "False"):
            # a head module or a bias after the scale: not a scale of the logits
            raise self.ctx.idx.error("cannot port the scale of the hidden states before lm_head",
                                     construct=f"{self.plan.causal_lm}.forward", rule=self.name)
        return ops

    def _unportable(self, node, where: str = "to the logits after"):
        return self.ctx.idx.error(f"cannot port what forward does {where} lm_head",
                                  construct=f"{self.plan.causal_lm}.forward", rule=self.name)

    def visit_Module(self, node):
        self._module = node
        return super().visit_Module(node) if hasattr(super(), "visit_Module") else True

    def _base_takes(self, param: str) -> bool:
        """The base model's forward (as the earlier rules left it) has parameter PARAM: one without
        positional encoding in its layers (Bloom: ALiBi in the Attention) has no `positions`; remote
        code's base model may take no `inputs_embeds`."""
        base = self.plan.top_classes[0] if self.plan.top_classes else None
        for st in getattr(self, "_module", cst.Module(body=[])).body:
            if isinstance(st, cst.ClassDef) and st.name.value == base:
                fwd = find_method(st, "forward")
                return fwd is None or param in param_names(fwd)
        return True

    def _base_call(self, info) -> str | None:
        fwd = info.method("forward")
        for call in findall(fwd, m.Call(func=m.Attribute())) if fwd else []:
            name = dotted(call.func)  # type: ignore[attr-defined]
            if name and name.startswith(f"self.{self.plan.base_attr}") and any(
                    a.keyword is not None and a.keyword.value == "input_ids" for a in call.args):  # type: ignore[attr-defined]
                return name[len("self."):]
        return None

    def _init(self, fn: cst.FunctionDef) -> cst.FunctionDef:
        ctx, plan, t = self.ctx, self.plan, self.ctx.target
        cfg = t.config_kwarg
        pre = [
            "super().__init__()\n",
            f"config = {cfg}.model_config.hf_config\n",
            f"cache_config = {cfg}.cache_config\n",
            f"quant_config = {cfg}.quant_config\n",
            "self.config = config\n",
        ]
        body: list[cst.BaseStatement] = [cst.parse_statement(s) for s in pre]
        logits_size = "config.vocab_size"
        for st in fn.body.body:
            if m.matches(st, m.SimpleStatementLine(body=[m.Expr(m.Call(func=m.Attribute(
                    value=m.Call(func=m.Name("super")))))])):
                continue
            if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(
                    m.Attribute(value=m.Name("self"), attr=m.Name("config")))])])):
                continue
            attr = None
            if m.matches(st, m.SimpleStatementLine(body=[m.Assign()])):
                attr = self_attr(st.body[0].targets[0].target)  # type: ignore[attr-defined]
            if attr is not None and attr == plan.lm_head:
                in_f, out_f, bias = linear_args(st.body[0].value)  # type: ignore[attr-defined]
                if plan.lm_head_normalized:  # a head class of the file: its weight's shape, no bias
                    head = ctx.idx.classes[dotted(st.body[0].value.func)]  # type: ignore[attr-defined]
                    sizes = head_sizes(head, st.body[0].value)  # type: ignore[attr-defined]
                    if sizes is None:
                        raise ctx.idx.error("cannot read the normalised head's vocabulary and hidden sizes", st,
                                            construct=head.name, rule=self.name)
                    (in_f, out_f), bias = sizes, "False"
                logits_size = out_f  # the head's rows (a pruned head has fewer than the vocab)
                bias_kw = "" if bias == "False" else f"bias={bias}, "
                body.append(cst.parse_statement(
                    f"self.{attr} = {ctx.use('ParallelLMHead')}({out_f}, {in_f}, {bias_kw}"
                    f"quant_config=quant_config, prefix={ctx.use('maybe_prefix')}(prefix, \"{attr}\"))\n"))
                if plan.lm_head_normalized:  # HF would normalise the shared embedding itself, in place
                    body.append(cst.parse_statement(
                        f"if {plan.tie_condition}:\n"
                        f"    raise ValueError(\"a head that normalises its rows tied to the embedding is not ported\")\n"))
                    continue
                tie = plan.tie_condition
                if tie == "config.tie_word_embeddings" and "model_should_use_tied_lm_head" in ctx.target.symbols:
                    # (Aphrodite's own ports: a checkpoint with its own quantized head keeps it untied)
                    body.append(cst.parse_statement(
                        f"self.use_tied_lm_head = {ctx.use('model_should_use_tied_lm_head')}(config, quant_config)\n"))
                    tie = "self.use_tied_lm_head"
                body.append(cst.parse_statement(
                    f"if {tie}:\n"
                    f"    self.{attr} = self.{attr}.tie_weights(self.{plan.embed_path})\n"))
                continue
            if isinstance(st, cst.If) and st.orelse is None and (helper := _helper_module_arm(st, self.ctx.removed_names)):
                # (Baichuan2's `if config.quantization_config ...: from .quantizer import ...; quantize_offline(self, 4)`)
                body.append(st.with_changes(body=cst.IndentedBlock(body=[cst.parse_statement(
                    f"raise NotImplementedError({_HELPER_ARM.format(helper)!r})\n")])))
                continue
            body.append(st)
        scale, soft_cap = self._logits_post(ctx.idx.classes[plan.causal_lm])
        extra = (f", scale={scale}" if scale else "") + (f", soft_cap={soft_cap}" if soft_cap else "")
        body.append(cst.parse_statement(
            f"self.logits_processor = {ctx.use('LogitsProcessor')}({logits_size}{extra})\n"))
        params = cst.parse_module(f"def f(self, *, {cfg}: {ctx.use('EngineConfig')}, prefix: str = ''): pass\n").body[0].params  # type: ignore[attr-defined]
        return fn.with_changes(params=params, body=fn.body.with_changes(body=body), returns=None)


def _experts_count(num_experts: str) -> str:
    """The block's expert count as load_weights reads it: over `self.config`; a count per layer
    (hunyuan_v1_moe: `config.num_experts[layer_idx]` where it is a list) as its largest, so the
    mapping names every expert of every layer."""
    from porter.analysis.cstutil import names_in

    node = cst.parse_expression(num_experts)
    if num_experts.startswith("config.") and "layer_idx" not in names_in(node):
        return num_experts.replace("config.", "self.config.", 1)  # (the committed ports' form)

    class _SelfConfig(cst.CSTTransformer):
        def leave_Name(self, original, updated):
            return cst.parse_expression("self.config") if updated.value == "config" else updated

    over_self = cst.Module([]).code_for_node(node.visit(_SelfConfig()))
    if "layer_idx" in names_in(node):
        return f"max({over_self} for layer_idx in range(self.config.num_hidden_layers))"
    return over_self


def _stacked_clash(ctx) -> bool:
    """Whether a linear that is no shard of a fused projection is named like one (afmoe's
    attention output gate `self_attn.gate_proj` beside the MLP's fused gate/up): then a stacked
    mapping applies only where the fused parameter exists."""
    plan = ctx.plan
    shards = {orig for _, orig, _ in plan.stacked_params}
    fused = {(g.cls, n) for g in plan.gate_ups for n in (g.gate, g.up)} | {
        (a.cls, n) for a in plan.attentions for n in (a.q, a.k, a.v)}
    return any(attr in shards and (name, attr) not in fused
               for name in plan.classes if name in ctx.idx.classes
               for attr in ctx.idx.classes[name].linears())


def _uncast(node: cst.BaseExpression) -> cst.BaseExpression:
    """`x.float()` -> `x` (a cast without arguments); anything else unchanged."""
    if m.matches(node, m.Call(func=m.Attribute(value=m.Name(), attr=m.Name("float")), args=[])):
        return node.func.value  # type: ignore[attr-defined]
    return node
