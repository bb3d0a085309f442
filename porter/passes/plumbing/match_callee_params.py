"""PT033 match-callee-params: the rule `MatchCalleeParams`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst

from porter.analysis.cstutil import loop_module, param_names, self_attr
from porter.passes.base import Example, Rule


class MatchCalleeParams(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT033"
    name = "match-callee-params"
    why = (
        "HF modules forward `**kwargs` and pass `position_ids=` to sub-modules that never read "
        "them. Once signatures are stripped, a keyword argument the called module's forward does "
        "not accept would fail at run time: it is dropped from the call."
    )
    examples = [
        Example(
            "from torch import nn\n\n\nclass MLP(nn.Module):\n    def forward(self, x):\n"
            "        return x\n\n\nclass Layer(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.mlp = MLP(config)\n\n"
            "    def forward(self, x, positions):\n"
            "        return self.mlp(x, positions=positions)\n",
            "from torch import nn\n\n\nclass MLP(nn.Module):\n    def forward(self, x):\n"
            "        return x\n\n\nclass Layer(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.mlp = MLP(config)\n\n"
            "    def forward(self, x, positions):\n        return self.mlp(x)\n",
        ),
        Example(
            "from torch import nn\n\n\nclass Layer(nn.Module):\n"
            "    def forward(self, x, positions):\n        return x\n\n\n"
            "class AModel(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.layers = nn.ModuleList([Layer(config) for _ in "
            "range(config.num_hidden_layers)])\n\n    def forward(self, x, positions):\n"
            "        for layer in self.layers:\n"
            "            x = layer(x, positions=positions, use_cache=True)\n        return x\n",
            "from torch import nn\n\n\nclass Layer(nn.Module):\n"
            "    def forward(self, x, positions):\n        return x\n\n\n"
            "class AModel(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n"
            "        self.layers = nn.ModuleList([Layer(config) for _ in "
            "range(config.num_hidden_layers)])\n\n    def forward(self, x, positions):\n"
            "        for layer in self.layers:\n            x = layer(x, positions=positions)\n"
            "        return x\n",
        ),
        Example(  # an HF-only parameter filled positionally (remote code's mask; PT010 strips the parameter)
            "from torch import nn\n\n\nclass Enc(nn.Module):\n    def forward(self, h, attention_mask, positions):\n"
            "        return h\n\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.encoder = Enc(config)\n\n"
            "    def forward(self, x, positions):\n        return self.encoder(x, mask, positions)\n",
            "from torch import nn\n\n\nclass Enc(nn.Module):\n    def forward(self, h, attention_mask, positions):\n"
            "        return h\n\n\nclass AModel(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.encoder = Enc(config)\n\n"
            "    def forward(self, x, positions):\n        return self.encoder(x, positions)\n",
        ),
    ]

    def visit_Module(self, node: cst.Module) -> None:
        self._accepts: dict[str, set[str] | None] = {}
        for st in node.body:
            if isinstance(st, cst.ClassDef):
                for item in st.body.body:
                    if isinstance(item, cst.FunctionDef) and item.name.value == "forward":
                        star = item.params.star_kwarg is not None
                        self._accepts[st.name.value] = None if star else set(param_names(item))
        self._loop_vars: dict[str, str] = {}

    def visit_For(self, node: cst.For) -> None:
        bound = loop_module(node)
        if bound:
            self._loop_vars[bound[0]] = bound[1]

    def leave_Call(self, original, updated):
        info = self.ctx.idx.classes.get(self.current_class or "")
        if not info or self.current_function == "__init__":
            return updated
        attr = self_attr(updated.func)
        if attr is None and isinstance(updated.func, cst.Name):
            attr = self._loop_vars.get(updated.func.value)
        sub = info.submodules.get(attr or "")
        mp = self.plan.moe(info.name)
        if mp is not None and attr in (mp.router, mp.experts):
            return updated  # now the engine's GateLinear / FusedMoE, not the HF class
        accepts = self._accepts.get(sub.ctor) if sub else None
        if accepts is None:
            return updated
        dropped = self._stripped_positions(sub.ctor, updated.args)
        args = [a for i, a in enumerate(updated.args)
                if i not in dropped and (a.keyword is None or a.keyword.value in accepts)]
        if len(args) == len(updated.args):
            return updated
        if args:
            args[-1] = args[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
        return updated.with_changes(args=args)

    def _stripped_positions(self, ctor: str, args) -> set[int]:
        """Indexes of positional ARGS that fill a parameter of the callee's HF forward that PT010
        stripped (remote code passes the mask positionally: `self.encoder(h, full_attention_mask, ...)`)."""
        orig = self.ctx.idx.classes.get(ctor)
        fwd = orig.method("forward") if orig else None
        if fwd is None:
            return set()
        names = [p.name.value for p in fwd.params.params][1:]  # after self
        out = set()
        for i, a in enumerate(args):
            if a.keyword is not None or a.star or i >= len(names):
                break
            if names[i] in self.ctx.table.strip_params:  # PT010 strips it from every kept forward
                out.add(i)
        return out

