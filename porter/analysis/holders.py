"""Where a model file's classes hold a module of a given class (the attribute names its tensors
are saved under)."""

from __future__ import annotations

import libcst.matchers as m

from porter.analysis.cstutil import findall


def holders(idx, cls: str, experts: frozenset[tuple[str, str]] = frozenset()) -> list[str] | None:
    """The attribute names under which the file's classes hold a CLS module, or None when one holds it
    in a list (its names carry an index: no fixed segment names its tensors). EXPERTS: the (class,
    attribute) of each list of experts the engine's fused MoE layer replaces (it loads their tensors
    by its own names), not a holder."""
    found: set[str] = set()
    for info in idx.classes.values():
        for attr, sub in info.submodules.items():
            if (info.name, attr) in experts:
                continue
            if sub.ctor == cls:
                if sub.in_list:
                    return None
                found.add(attr)
        # every assignment builds one (the index keeps an attribute's first: DeepSeek's `self.mlp` is
        # the MoE in one arm and the dense MLP in the other)
        init = info.method("__init__")
        for node in findall(init, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))])) if init else []:
            attr = node.targets[0].target.attr.value  # type: ignore[attr-defined]
            if (info.name, attr) not in experts and findall(node.value, m.Call(func=m.Name(cls))):
                if findall(node.value, m.ListComp() | m.GeneratorExp()):
                    return None
                found.add(attr)
    return sorted(found)
