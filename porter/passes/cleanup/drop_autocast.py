"""Drop HF's mixed-precision autocast plumbing: the engine runs a model in one dtype."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import dotted
from porter.passes.base import Example, Rule


def _returns_args_unless_autocast(fn: cst.FunctionDef) -> bool:
    """`def f(device_type, *args): if not torch.is_autocast_enabled(): return args ...`"""
    star = fn.params.star_arg
    if not isinstance(star, cst.Param) or not fn.body.body:
        return False
    first = fn.body.body[0]
    return m.matches(first, m.If(
        test=m.UnaryOperation(operator=m.Not(), expression=m.Call(
            func=m.Attribute(value=m.Name("torch"), attr=m.Name("is_autocast_enabled")))),
        body=m.IndentedBlock(body=[m.SimpleStatementLine(body=[m.Return(value=m.Name(star.name.value))])]),
    ))


class DropAutocast(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT121"
    name = "drop-autocast"
    why = (
        "Some HF norms guard their arithmetic against torch autocast: `with maybe_autocast(..., "
        "enabled=False):` around the call, and a helper that casts its arguments only when autocast "
        "is on (`if not torch.is_autocast_enabled(): return args`). The engine runs the whole model "
        "in one dtype and never enables autocast, so the `with` block is replaced by its body and the "
        "helper call by the tuple of arguments it would return unchanged (its device argument dropped)."
    )
    @classmethod
    def applies(cls, ctx) -> bool:
        return any("autocast" in name for name in ctx.idx.identifiers)

    examples = [
        Example(
            "def _cast(device_type, *args):\n    if not torch.is_autocast_enabled():\n        return args\n"
            "    return torch.amp.autocast_mode._cast(args, device_type, torch.half)\n\n\n"
            "class Norm(nn.LayerNorm):\n    def forward(self, x):\n        device_type = x.device.type\n"
            "        args = _cast(device_type, x, self.normalized_shape, self.weight + 1.0)\n"
            "        with maybe_autocast(device_type=x.device.type, enabled=False):\n"
            "            return F.layer_norm(*args)\n",
            "def _cast(device_type, *args):\n    if not torch.is_autocast_enabled():\n        return args\n"
            "    return torch.amp.autocast_mode._cast(args, device_type, torch.half)\n\n\n"
            "class Norm(nn.LayerNorm):\n    def forward(self, x):\n        device_type = x.device.type\n"
            "        args = (x, self.normalized_shape, self.weight + 1.0)\n"
            "        return F.layer_norm(*args)\n",
        )
    ]

    def _autocast_names(self) -> set[str]:
        return {"maybe_autocast", "torch.autocast", "torch.amp.autocast", "autocast"}

    def leave_Call(self, original, updated):
        if not self.kept(self.current_class):
            return updated
        name = dotted(updated.func)
        fn = self.ctx.idx.functions.get(name or "")
        if fn is None or not _returns_args_unless_autocast(fn) or len(updated.args) < 2:
            return updated
        if any(a.keyword is not None or a.star for a in updated.args):
            return updated
        rest = [a.value for a in updated.args[1:]]
        return cst.Tuple(elements=[cst.Element(v) for v in rest])

    def leave_IndentedBlock(self, original, updated):
        if not self.kept(self.current_class):
            return updated
        body: list[cst.BaseStatement] = []
        changed = False
        for st in updated.body:
            if isinstance(st, cst.With) and len(st.items) == 1 and isinstance(st.items[0].item, cst.Call) \
                    and dotted(st.items[0].item.func) in self._autocast_names() and st.items[0].asname is None \
                    and any(m.matches(a, m.Arg(keyword=m.Name("enabled"), value=m.Name("False")))
                            for a in st.items[0].item.args) \
                    and isinstance(st.body, cst.IndentedBlock):
                body.extend(st.body.body)
                changed = True
                continue
            body.append(st)
        return updated.with_changes(body=body) if changed else updated
