"""Rules on forward() signatures: strip HF-only parameters, rename to the engine's names."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import assigned_names, findall, names_in, param_names

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

    def leave_Arg(self, original, updated):
        if self._in_forward() and updated.keyword is not None and updated.keyword.value in self.ctx.table.rename_params:
            return updated.with_changes(keyword=cst.Name(self.ctx.table.rename_params[updated.keyword.value]))
        return updated
