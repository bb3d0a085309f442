"""Rules on forward() signatures: strip HF-only parameters, rename to the engine's names."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import assigned_names, findall, loop_module, names_in, param_names, self_attr

from porter.passes.base import Example, Rule


class StripHfParams(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT010"
    name = "strip-hf-params"
    why = (
        "The engine calls forward on flattened tokens with `positions`; it never passes an "
        "attention mask, a cache, output flags or labels (the Attention layer finds its KV cache "
        "and batch metadata in the forward context). Those parameters, `**kwargs`, `*args` (unless "
        "forward hands it on: TrOCR's pass-through wrapper) and HF return annotations go; "
        "`position_ids` becomes `positions`. Both lists are data (rules/hf_strip.yaml: strip_params, "
        "rename_params)."
    )
    examples = [
        Example(
            "class A(nn.Module):\n    def forward(self, x, attention_mask=None, position_ids=None, **kwargs) -> Out:\n"
            "        return self.f(x, position_ids)\n",
            "class A(nn.Module):\n    def forward(self, x, positions=None):\n"
            "        return self.f(x, positions)\n",
        ),
        Example(  # a local already named `positions` (BioGPT's position embeddings) is renamed first
            "class A(nn.Module):\n    def forward(self, x, position_ids=None):\n"
            "        positions = self.embed_positions(x, position_ids=position_ids)\n"
            "        return x + positions\n",
            "class A(nn.Module):\n    def forward(self, x, positions=None):\n"
            "        positions_embeds = self.embed_positions(x, positions=positions)\n"
            "        return x + positions_embeds\n",
        ),
        Example(  # a value handed to a sub-module's **kwargs, which HF never reads (5.25's Cohere Compass)
            "from torch import nn\n\n\nclass Layer(nn.Module):\n    def forward(self, x, **kwargs):\n        return x\n\n\n"
            "class AModel(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.layers = nn.ModuleList([Layer(config) for _ in range(2)])\n\n"
            "    def forward(self, x, position_ids=None):\n        text_ids = position_ids[0]\n"
            "        for layer in self.layers:\n            x = layer(x, position_ids=text_ids)\n        return x\n",
            "from torch import nn\n\n\nclass Layer(nn.Module):\n    def forward(self, x):\n        return x\n\n\n"
            "class AModel(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.layers = nn.ModuleList([Layer(config) for _ in range(2)])\n\n"
            "    def forward(self, x, positions=None):\n        text_ids = positions[0]\n"
            "        for layer in self.layers:\n            x = layer(x)\n        return x\n",
        ),
    ]

    def _in_forward(self) -> bool:
        return self.kept(self.current_class) and "forward" in self.scope[1:]

    def leave_FunctionDef(self, original, updated):
        super().leave_FunctionDef(original, updated)
        if not (self.kept(self.current_class) and len(self.scope) == 1 and updated.name.value == "forward"):
            return updated
        t = self.ctx.table
        params = []
        for p in updated.params.params:
            name = p.name.value
            if name in t.strip_params:
                continue
            if name in t.rename_params:
                p = p.with_changes(name=cst.Name(t.rename_params[name]))
            params.append(p)
        if params:
            params[-1] = params[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
        star = updated.params.star_arg
        if not (isinstance(star, cst.Param) and star.name.value in names_in(updated.body)):
            star = cst.MaybeSentinel.DEFAULT  # `*args` a pass-through wrapper hands on stays (TrOCR's)
        new_params = updated.params.with_changes(
            params=params, star_kwarg=None, star_arg=star,
            kwonly_params=[p for p in updated.params.kwonly_params if p.name.value not in t.strip_params],
        )
        return updated.with_changes(params=new_params, returns=None)

    def visit_FunctionDef(self, node):
        """A local of forward named like what a parameter is renamed to (BioGPT binds `positions` to
        its position embeddings beside `position_ids`) is renamed first (`positions_embeds`), so the
        engine's `positions` stays the positions."""
        if len(self.scope) == 1 and node.name.value == "forward":
            renamed = {self.ctx.table.rename_params[p] for p in param_names(node) if p in self.ctx.table.rename_params}
            bound = {n for a in findall(node.body, m.AssignTarget()) for n in assigned_names(a.target)}  # type: ignore[attr-defined]
            self._clash = renamed & bound
            self._not_locals = {id(a.keyword) for a in findall(node, m.Arg(keyword=m.Name()))} | {
                id(a.attr) for a in findall(node, m.Attribute())}
        return super().visit_FunctionDef(node)

    def leave_Name(self, original, updated):
        if self._in_forward() and updated.value in getattr(self, "_clash", ()) and id(original) not in self._not_locals:
            return updated.with_changes(value=f"{updated.value}_embeds")
        if self._in_forward() and updated.value in self.ctx.table.rename_params:
            return updated.with_changes(value=self.ctx.table.rename_params[updated.value])
        return updated

    def visit_For(self, node: cst.For) -> None:
        bound = loop_module(node)
        if bound:
            self._loop_vars = {**getattr(self, "_loop_vars", {}), bound[0]: bound[1]}

    def _unread_positions(self, call: cst.Call) -> bool:
        """CALL hands a sub-module `position_ids=` something other than forward's own `position_ids`,
        and the sub-module's HF forward has no such parameter: the value sinks into its `**kwargs`,
        which HF's eager attention never reads (transformers 5.25's Cohere Compass passes its text row
        `position_ids[0]`, None for anything but its 4-row layout). The engine's rotary reads the
        positions PT031 threads, so the keyword goes rather than becoming `positions=`."""
        info = self.ctx.idx.classes.get(self.current_class or "")
        attr = self_attr(call.func)
        if attr is None and isinstance(call.func, cst.Name):
            attr = getattr(self, "_loop_vars", {}).get(call.func.value)
        sub = info.submodules.get(attr or "") if info else None
        callee = self.ctx.idx.classes.get(sub.ctor) if sub else None
        fwd = callee.method("forward") if callee else None
        return fwd is not None and fwd.params.star_kwarg is not None and "position_ids" not in param_names(fwd)

    def leave_Call(self, original, updated):
        if not self._in_forward():
            return updated
        drop = [i for i, a in enumerate(original.args)
                if a.keyword is not None and a.keyword.value == "position_ids"
                and not m.matches(a.value, m.Name("position_ids"))]
        if not drop or not self._unread_positions(original):
            return updated
        args = [a for i, a in enumerate(updated.args) if i not in drop]
        if args:
            args[-1] = args[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
        return updated.with_changes(args=args)

    def leave_Arg(self, original, updated):
        if self._in_forward() and updated.keyword is not None and updated.keyword.value in self.ctx.table.rename_params:
            return updated.with_changes(keyword=cst.Name(self.ctx.table.rename_params[updated.keyword.value]))
        return updated
