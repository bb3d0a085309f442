"""The causal-LM class: engine constructor, lm_head, logits, load_weights."""

from __future__ import annotations

from pathlib import Path

import jinja2
import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, dotted, find_method, findall, param_names, self_attr, self_call_attr
from porter.analysis.index import LINEAR_NAMES
from porter.plan import linear_args
from porter.passes.base import Example, Rule

TEMPLATES = Path(__file__).resolve().parent.parent.parent / "templates"
_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), keep_trailing_newline=True,
                          undefined=jinja2.StrictUndefined)


def render(name: str, **kw) -> str:
    return _ENV.get_template(name).render(**kw)


def _indent(text: str) -> str:
    return "".join(("    " + line) if line.strip() else line for line in text.splitlines(True))


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
        "mapping, so the fused layers and their loader always agree."
    )
    examples = [
        Example(
            "from torch import nn\n\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)\n\n\n"
            "class AForCausalLM(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.model = AModel(config)\n"
            "        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)\n"
            "\n    def forward(self, input_ids):\n"
            "        return self.lm_head(self.model(input_ids=input_ids))\n",
            "from torch import nn\n\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)\n\n\n"
            "class AForCausalLM(nn.Module):\n"
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
            "    def load_weights(self, weights: Iterable[tuple[str, "
            "torch.Tensor]]) -> set[str]:\n        stacked_params_mapping = [\n"
            "            # (param_name, shard_name, shard_id)\n        ]\n"
            "        params_dict = dict(self.named_parameters())\n"
            "        loaded_params: set[str] = set()\n"
            "        for name, loaded_weight in weights:\n"
            '            if "rotary_emb.inv_freq" in name:\n                continue\n'
            '            if self.config.tie_word_embeddings and name.startswith("lm_head."):\n'
            "                continue\n"
            "            for param_name, shard_name, shard_id in stacked_params_mapping:\n"
            "                if shard_name not in name:\n                    continue\n"
            "                name = name.replace(shard_name, param_name)\n"
            "                param = params_dict[name]\n"
            "                param.weight_loader(param, loaded_weight, shard_id)\n"
            "                break\n            else:\n                param = params_dict[name]\n"
            '                weight_loader = getattr(param, "weight_loader", '
            "default_weight_loader)\n                weight_loader(param, loaded_weight)\n"
            "            loaded_params.add(name)\n        return loaded_params\n",
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
            "        stacked_params_mapping = [\n"
            "            # (param_name, shard_name, shard_id)\n"
            "        ]\n"
            "        params_dict = dict(self.named_parameters())\n"
            "        loaded_params: set[str] = set()\n"
            "        for name, loaded_weight in weights:\n"
            '            if "rotary_emb.inv_freq" in name:\n'
            "                continue\n"
            '            if self.config.tie_word_embeddings and name == "decoder.weight":\n'
            "                continue  # the embedding's; the head's own bias still loads\n"
            "            for param_name, shard_name, shard_id in stacked_params_mapping:\n"
            "                if shard_name not in name:\n"
            "                    continue\n"
            "                name = name.replace(shard_name, param_name)\n"
            "                param = params_dict[name]\n"
            "                param.weight_loader(param, loaded_weight, shard_id)\n"
            "                break\n"
            "            else:\n"
            "                param = params_dict[name]\n"
            '                weight_loader = getattr(param, "weight_loader", default_weight_loader)\n'
            "                weight_loader(param, loaded_weight)\n"
            "            loaded_params.add(name)\n"
            "        return loaded_params\n",
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
        if plan.lm_head and plan.lm_head in info.submodules:
            lm_head_bias = linear_args(info.submodules[plan.lm_head].call)[2] != "False"
        methods = render("causal_lm_methods.py.j2", embed_path=plan.embed_path, base_call=base_call,
                         lm_head=plan.lm_head or "lm_head", lm_head_bias=lm_head_bias,
                         base_positions=self._base_takes_positions(), pre_head=self._pre_head(info))
        ctx.use("IntermediateTensors")
        stacked = [(f, o, s if s.isdigit() else repr(s)) for f, o, s in plan.stacked_params]
        interleaved = sorted({f".{a.q}." for a in plan.attentions if a.interleaved})
        grouped = sorted({f".{a.q}." for a in plan.attentions if a.grouped})
        experts = []
        for mp in plan.moes:
            gate, down, up = mp.ckpt_names
            e = dict(attr=mp.experts, gate=gate, down=down, up=up, packed=mp.packed,
                     gate_up_param=mp.gate_up, down_param=mp.down,
                     num_experts=mp.num_experts.replace("config.", "self.config.", 1))
            if e not in experts:
                experts.append(e)
        if any(not e["packed"] for e in experts):
            ctx.use("fused_moe_make_expert_params_mapping")
        interleaved_unless = sorted({(f".{a.q}.", a.interleaved_unless) for a in plan.attentions
                                     if a.interleaved_unless})
        lw = render("load_weights.py.j2", stacked=stacked, lm_head=plan.lm_head or "lm_head",
                    lm_head_bias=lm_head_bias,
                    interleaved=interleaved, interleaved_unless=interleaved_unless, grouped=grouped,
                    transposed=repr(tuple(f".{a}.weight" for a in plan.transposed_linears)),
                    renames=plan.checkpoint_renames, experts=experts,
                    # engine activation classes (PT140) hold persistent buffers the checkpoint carries
                    load_buffers=any(s.startswith("act_class_") for s in ctx.engine_symbols))
        ctx.use("default_weight_loader")
        for fn in cst.parse_module(methods + "\n\n" + lw).body:
            body.append(fn)
        self.mark(plan.causal_lm)
        del t
        return updated.with_changes(body=updated.body.with_changes(body=body))

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

        def collect(block) -> None:
            for st in block:
                if isinstance(st, cst.If):
                    if not (set(n.value for n in findall(st.test, m.Name())) & stripped):  # type: ignore[attr-defined]
                        collect(st.body.body)
                elif isinstance(st, cst.SimpleStatementLine):
                    stmts.extend(st.body)

        collect(fwd.body.body)
        names: set[str] = set()
        ops: list[tuple[str, str]] = []
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

    def _unportable(self, node):
        return self.ctx.idx.error("cannot port what forward does to the logits after lm_head",
                                  construct=f"{self.plan.causal_lm}.forward", rule=self.name)

    def visit_Module(self, node):
        self._module = node
        return super().visit_Module(node) if hasattr(super(), "visit_Module") else True

    def _base_takes_positions(self) -> bool:
        """The base model's forward (as the earlier rules left it) has a `positions` parameter; one
        without positional encoding in its layers (Bloom: ALiBi in the Attention) has none."""
        base = self.plan.top_classes[0] if self.plan.top_classes else None
        for st in getattr(self, "_module", cst.Module(body=[])).body:
            if isinstance(st, cst.ClassDef) and st.name.value == base:
                fwd = find_method(st, "forward")
                return fwd is None or "positions" in param_names(fwd)
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
                logits_size = out_f  # the head's rows (a pruned head has fewer than the vocab)
                bias_kw = "" if bias == "False" else f"bias={bias}, "
                body.append(cst.parse_statement(
                    f"self.{attr} = {ctx.use('ParallelLMHead')}({out_f}, {in_f}, {bias_kw}"
                    f"quant_config=quant_config, prefix={ctx.use('maybe_prefix')}(prefix, \"{attr}\"))\n"))
                body.append(cst.parse_statement(
                    f"if {plan.tie_condition}:\n"
                    f"    self.{attr} = self.{attr}.tie_weights(self.{plan.embed_path})\n"))
                continue
            body.append(st)
        scale, soft_cap = self._logits_post(ctx.idx.classes[plan.causal_lm])
        extra = (f", scale={scale}" if scale else "") + (f", soft_cap={soft_cap}" if soft_cap else "")
        body.append(cst.parse_statement(
            f"self.logits_processor = {ctx.use('LogitsProcessor')}({logits_size}{extra})\n"))
        params = cst.parse_module(f"def f(self, *, {cfg}: {ctx.use('EngineConfig')}, prefix: str = ''): pass\n").body[0].params  # type: ignore[attr-defined]
        return fn.with_changes(params=params, body=fn.body.with_changes(body=body), returns=None)


class CompileBaseModel(Rule):
    descend_methods = frozenset()
    code = "PT052"
    name = "compile-base-model"
    why = (
        "vLLM compiles the base model (the stack of decoder layers) when a user runs without "
        "`enforce_eager`: a hand-written port decorates that class with "
        "`@support_torch_compile` and names the flattened-token dimension of each tensor "
        "argument of its forward as dynamic. Without it the port runs eager where the native "
        "model and the Transformers backend compile. Only the causal LM's direct sub-model "
        "is decorated; arguments that are not token-indexed tensors stay static."
    )
    examples = [
        Example(
            "class AModel(nn.Module):\n"
            "    def forward(self, input_ids, positions, inputs_embeds=None):\n"
            "        return input_ids\n",
            "@support_torch_compile(dynamic_arg_dims={'input_ids': 0, 'positions': 0, "
            "'inputs_embeds': 0})\n"
            "class AModel(nn.Module):\n"
            "    def forward(self, input_ids, positions, inputs_embeds=None):\n"
            "        return input_ids\n",
            seed={"top_classes": ["AModel"]},
        )
    ]
    # forward arguments indexed by the flattened token dimension (dim 0) in the engine
    TOKEN_ARGS = ("input_ids", "positions", "inputs_embeds", "intermediate_tensors")

    def leave_ClassDef(self, original, updated):
        super().leave_ClassDef(original, updated)
        if self.scope or updated.name.value not in self.plan.top_classes:
            return updated
        fwd = find_method(updated, "forward")
        args = [a for a in param_names(fwd) if a in self.TOKEN_ARGS] if fwd else []
        if not args:
            return updated
        dims = ", ".join(f"{a!r}: 0" for a in args)
        dec = cst.Decorator(cst.parse_expression(
            f"{self.ctx.use('support_torch_compile')}(dynamic_arg_dims={{{dims}}})"))
        return updated.with_changes(decorators=[*updated.decorators, dec])


class PruneUnreachable(Rule):
    visits_dropped_code = True
    descends = False
    code = "PT060"
    name = "prune-unreachable"
    why = (
        "The port keeps only what the causal LM needs: other heads (sequence classification, QA), "
        "the PreTrainedModel base, replaced norm and rotary classes, nn.Linear subclasses the engine's "
        "parallel linears replaced, and helper functions no kept code calls any more (rotate_half, "
        "repeat_kv, eager attention) are removed."
    )
    examples = [
        Example(
            "from torch import nn\n\n\nclass ARMSNorm(nn.Module):\n    def forward(self, x):\n"
            "        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, "
            "keepdim=True) + self.eps)\n\n\ndef rotate_half(x):\n"
            "    return torch.cat((-x[..., 1:], x[..., :1]), dim=-1)\n\n\n"
            "class ALayer(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.norm = RMSNorm(config.hidden_size)\n",
            "from torch import nn\n\n\nclass ALayer(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.norm = RMSNorm(config.hidden_size)\n",
        ),
        Example(
            "from torch import nn\n\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)\n\n\n"
            "class AForCausalLM(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.model = AModel(config)\n"
            "        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)\n"
            "\n    def forward(self, input_ids):\n"
            "        return self.lm_head(self.model(input_ids=input_ids))\n\n\n"
            "class AForSequenceClassification(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.model = AModel(config)\n",
            "from torch import nn\n\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)\n\n\n"
            "class AForCausalLM(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.model = AModel(config)\n"
            "        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)\n"
            "\n    def forward(self, input_ids):\n"
            "        return self.lm_head(self.model(input_ids=input_ids))\n",
        ),
        Example(  # an nn.Linear subclass the engine's parallel linears replaced (Falcon's FalconLinear)
            "from torch import nn\n\n\nclass ALinear(nn.Linear):\n    def forward(self, x):\n"
            "        return x @ self.weight.T\n\n\nclass AMLP(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.fc = ColumnParallelLinear(config.hidden_size, config.intermediate_size)\n",
            "from torch import nn\n\n\nclass AMLP(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.fc = ColumnParallelLinear(config.hidden_size, config.intermediate_size)\n",
        ),
    ]

    def leave_Module(self, original, updated):
        keep = set(self.plan.classes)
        body = list(updated.body)
        names_of: dict[int, set[str]] = {}  # per statement, computed once

        def names(st) -> set[str]:
            if id(st) not in names_of:
                if isinstance(st, cst.ClassDef):
                    parts = [st.body, *st.bases, *st.decorators]
                elif isinstance(st, cst.FunctionDef):
                    parts = [st.body, st.params, *st.decorators]
                else:
                    parts = [st]
                names_of[id(st)] = {n.value for part in parts for n in findall(part, m.Name())}  # type: ignore[attr-defined]
            return names_of[id(st)]

        def function_class(st) -> bool:
            """A `torch.autograd.Function` subclass: a function in class form (Bloom's GeLU), kept when called."""
            return isinstance(st, cst.ClassDef) and any(
                (dotted(b.value) or "").endswith("autograd.Function") for b in st.bases)

        def replaced_linear(st) -> bool:
            """A kept nn.Linear subclass (Falcon's FalconLinear): the engine's parallel linears took
            its place, so it goes once no kept code names it."""
            return isinstance(st, cst.ClassDef) and any(
                self.ctx.idx.qualify(dotted(b.value)) in LINEAR_NAMES for b in st.bases)

        keep -= {st.name.value for st in body if replaced_linear(st) and st.name.value in keep and not any(
            st.name.value in names(o) for o in body if o is not st and isinstance(o, (cst.ClassDef, cst.FunctionDef))
            and (not isinstance(o, cst.ClassDef) or o.name.value in keep))}
        while True:
            used: set[str] = set()
            for st in body:
                if isinstance(st, cst.ClassDef) and st.name.value not in keep and not function_class(st):
                    continue
                if isinstance(st, (cst.ClassDef, cst.FunctionDef)):
                    used |= names(st)
            new_body = []
            for st in body:
                if isinstance(st, cst.ClassDef) and st.name.value not in keep and not (
                        function_class(st) and st.name.value in used):
                    continue
                if isinstance(st, cst.FunctionDef) and st.name.value not in used:
                    continue
                if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())])])):
                    if st.body[0].targets[0].target.value not in used:  # type: ignore[attr-defined]
                        continue
                new_body.append(st)
            if len(new_body) == len(body):
                break
            body = new_body
        kept_ids = {id(st) for st in body}
        for st in updated.body:
            if id(st) in kept_ids:
                continue
            if isinstance(st, (cst.ClassDef, cst.FunctionDef)):
                self.mark(st.name.value)  # the diff labels each removed definition with this rule
            else:
                self.mark("<module>")
        return updated.with_changes(body=body)


class EngineImports(Rule):
    visits_dropped_code = True
    reads_target = True
    descends = False
    code = "PT070"
    name = "engine-imports"
    why = (
        "Imports are rebuilt from what the port uses: unused imports left from HF are removed and "
        "each engine symbol is imported from the module the target's symbol map names "
        "(rules/targets.yaml), so one plan yields a vLLM and an Aphrodite port."
    )
    examples = [
        Example(
            '"""A model."""\nimport math\nimport torch\nfrom torch import nn\n\n\n'
            "class A(nn.Module):\n    def forward(self, x) -> torch.Tensor:\n        return x\n",
            '"""A model."""\nimport torch\nfrom torch import nn\n\n\nclass A(nn.Module):\n'
            "    def forward(self, x) -> torch.Tensor:\n        return x\n",
        ),
        Example(
            "from typing import Optional\nimport torch\n\n\n"
            "def load_weights(weights: Iterable[tuple[str, torch.Tensor]]):\n    pass\n",
            "from collections.abc import Iterable\nimport torch\n\n\n"
            "def load_weights(weights: Iterable[tuple[str, torch.Tensor]]):\n    pass\n",
        ),
    ]

    def _first_use(self, name: str):
        """Where the port would still use `name`: its first call, else its first use outside imports."""
        for node in findall(self.ctx.idx.module, m.Call(func=m.Name(name))):
            return node
        for st in self.ctx.idx.module.body:
            if m.matches(st, m.SimpleStatementLine(body=[m.Import() | m.ImportFrom()])):
                continue
            for node in findall(st, m.Name(name)):
                return node
        return None

    def leave_Module(self, original, updated):
        used = {
            n.value  # type: ignore[attr-defined]
            for st in updated.body
            if not m.matches(st, m.SimpleStatementLine(body=[m.Import() | m.ImportFrom()]))
            for n in findall(st, m.Name())
        }
        leftover = sorted(used & self.ctx.removed_names)
        if leftover:
            # the port still calls a transformers helper that only HF's package provides
            raise self.ctx.idx.error(
                f"the port would still use transformers' {', '.join(leftover)}: no rule replaces it",
                self._first_use(leftover[0]), construct=leftover[0], rule=self.name)
        header, rest = [], []
        # a name the engine's import binds (Bloom's `from torch.nn import LayerNorm` beside the engine's LayerNorm)
        engine_names = {self.ctx.target.symbols[s].split(":")[1] for s in self.ctx.engine_symbols} & used
        for st in updated.body:
            if m.matches(st, m.SimpleStatementLine(body=[m.Import() | m.ImportFrom()])):
                imp = st.body[0]  # type: ignore[attr-defined]
                names = [a for a in imp.names if (bound := (a.asname.name.value if a.asname else (dotted(a.name) or "").split(".")[0])) in used
                         and bound not in engine_names] \
                    if not isinstance(imp.names, cst.ImportStar) else imp.names
                if names:
                    names = [a.with_changes(comma=cst.MaybeSentinel.DEFAULT) for a in names]
                    header.append(st.with_changes(body=[imp.with_changes(names=names)]))
                continue
            rest.append(st)
        if "re" in used and not any(code(h).strip() == "import re" for h in header):
            header.insert(0, cst.parse_statement("import re\n"))
        if "Iterable" in used and not any("Iterable" in code(h) for h in header):
            header.insert(0, cst.parse_statement("from collections.abc import Iterable\n"))
        by_module: dict[str, list[str]] = {}
        for sym in sorted(self.ctx.engine_symbols):
            mod, attr = self.ctx.target.symbols[sym].split(":")
            if attr in used:
                by_module.setdefault(mod, []).append(attr)
        for mod in sorted(by_module):
            header.append(cst.parse_statement(f"from {mod} import {', '.join(sorted(by_module[mod]))}\n"))
        # keep a leading docstring first
        doc = []
        if rest and m.matches(rest[0], m.SimpleStatementLine(body=[m.Expr(m.SimpleString())])):
            doc = [rest.pop(0)]
        self.mark("<module>")
        return updated.with_changes(body=[*doc, *header, *rest])
