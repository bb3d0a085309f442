"""PT060 prune-unreachable: the rule `PruneUnreachable`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import dotted, findall
from porter.analysis.index import LINEAR_NAMES
from porter.passes.base import Example, Rule


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
                # `X.helper` reads the attribute of X, not the module's `helper` (MiniCPM's dead
                # `_make_causal_mask` returns `AttentionMaskConverter._make_causal_mask(...)`)
                attrs = {id(a.attr) for part in parts for a in findall(part, m.Attribute())}  # type: ignore[attr-defined]
                names_of[id(st)] = {n.value for part in parts for n in findall(part, m.Name())  # type: ignore[attr-defined]
                                    if id(n) not in attrs}
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
