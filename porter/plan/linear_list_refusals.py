"""Refusal of a list of linears under one attribute outside the layer stack (Gemma-3n's AltUp:
`self.altup_projections = nn.ModuleList([nn.Linear(h, h) for _ in range(1, n)])`, each applied to
its own copy of the hidden states). The tensor-parallel rules build one engine linear per
attribute from its in/out features; a list of them, indexed in forward, no rule maps."""

from __future__ import annotations

from typing import TYPE_CHECKING

from porter.analysis.cstutil import code
from porter.plan.refusals import _ATTN_HEAD, Refusal

if TYPE_CHECKING:
    from porter.analysis.index import ClassInfo
    from porter.plan.model import PlanningContext as Planner

LINEAR_LIST = Refusal(
    "a list of linears under one attribute (`{attr} = {build}`), each applied on its own in forward: the "
    "engine's parallel linears are built one per attribute; no rule maps a list of them",
    _ATTN_HEAD + "class Mix(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.projs = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])\n\n"
    "    def forward(self, x):\n        return [p(x) for p in self.projs]\n",
    "<example>:8: a list of linears under one attribute (`self.projs = nn.ModuleList([nn.Linear(8, 8) for _ in "
    "range(3)])`), each applied on its own in forward: the engine's parallel linears are built one per attribute; "
    "no rule maps a list of them in class Mix (rule tp-linears)",
    rule="tp-linears",
)


def linear_list(p: Planner, info: ClassInfo, linears: dict) -> None:
    """Refuse a linear the index found inside a list build (`nn.ModuleList([nn.Linear(...) ...])`)."""
    for attr, sub in linears.items():
        if sub.in_list:
            node = info.node
            raise LINEAR_LIST.error(p, sub.call, f"class {info.name}", attr=f"self.{attr}",
                                    build=_list_build(node, attr) or code(sub.call))


def _list_build(node, attr: str) -> str | None:
    import libcst.matchers as m

    from porter.analysis.cstutil import findall

    for a in findall(node, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self"), attr=m.Name(attr)))])):
        return " ".join(code(a.value).split()).replace("( ", "(").replace("[ ", "[").replace(" )", ")")  # type: ignore[attr-defined]
    return None
