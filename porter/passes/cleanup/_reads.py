"""Which attribute names a module still reads: what PT310 and PT311 ask before removing an assignment."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import dotted, findall
from porter.analysis.index import ModelIndex


def of_config(base: cst.BaseExpression) -> bool:
    """`config`, `self.config`, `config.attn_config`: an HF config object (its fields are not a module's)."""
    parts = (dotted(base) or "").split(".")
    return any(p == "config" or p.endswith("_config") for p in parts)


def live_code(module: cst.Module, kept: set[str]) -> list[cst.CSTNode]:
    """The module's statements but the classes the port drops (other heads: PT060 removes them later),
    unless kept code names them."""
    names = {n.value for st in module.body if isinstance(st, cst.ClassDef) and st.name.value in kept
             for n in findall(st, m.Name())}  # type: ignore[attr-defined]
    return [st for st in module.body if not isinstance(st, cst.ClassDef) or not kept
            or st.name.value in kept or st.name.value in names]


def attribute_uses(module: cst.Module, idx: ModelIndex, kept: set[str]) -> dict[str, int]:
    """Per name, how many `.name` of the module's live code can be a module's attribute: all but a config's
    fields (`config.attention_dropout`) and an imported module's members (`nn.functional.dropout`)."""
    uses: dict[str, int] = {}
    for st in live_code(module, kept):
        for a in findall(st, m.Attribute()):
            base = a.value  # type: ignore[attr-defined]
            if of_config(base) or (dotted(base) or "").partition(".")[0] in idx.imports:
                continue
            uses[a.attr.value] = uses.get(a.attr.value, 0) + 1  # type: ignore[attr-defined]
    return uses


def named(module: cst.Module, kept: set[str]) -> set[str]:
    """Every string literal of the module's live code (an attribute read by name: `getattr(self.attn, "x")`)."""
    return {s.evaluated_value for st in live_code(module, kept) for s in findall(st, m.SimpleString())  # type: ignore[attr-defined]
            if isinstance(s.evaluated_value, str)}  # type: ignore[attr-defined]
