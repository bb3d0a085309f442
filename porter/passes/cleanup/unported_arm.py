"""PT035 unported-arm: the rule `UnportedArm`; its `why` says what it rewrites and why."""

from __future__ import annotations

import json

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, findall, self_attr
from porter.passes._edit import append_to_init
from porter.passes.base import Example, Rule

_CLS = (
    "class MLP(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.config = config\n        self.gate_up_proj = MergedColumnParallelLinear(8, [16] * 2)\n"
)


def _init_attrs(cls: cst.ClassDef) -> dict[str, str]:
    """The `self.X` that __init__ assigns -> the callee that builds it ("" if not a call)."""
    out: dict[str, str] = {}
    for fn in cls.body.body:
        if isinstance(fn, cst.FunctionDef) and fn.name.value == "__init__":
            for a in findall(fn, m.Assign(targets=[m.AssignTarget(target=m.Attribute(value=m.Name("self")))])):
                v = a.value  # type: ignore[attr-defined]
                out[a.targets[0].target.attr.value] = code(v.func) if isinstance(v, cst.Call) else ""  # type: ignore[attr-defined]
    return out


class UnportedArm(Rule):
    descend_methods = frozenset()
    code = "PT035"
    name = "unported-arm"
    why = (
        "transformers 4.x Llama computes its projections in an arm of its own when "
        "`config.pretraining_tp > 1` (slices of `self.q_proj.weight`, `self.gate_proj.weight` through "
        "`F.linear`). Once the projections are the engine's fused parallel linears those weights do "
        "not exist, so that arm cannot run in the port: forward keeps the `else` arm, and __init__ "
        "refuses a config that takes the other one, with the reason (at load, never a silent "
        "approximation)."
    )
    examples = [
        Example(
            _CLS + "\n    def forward(self, x):\n        if self.config.pretraining_tp > 1:\n"
            "            s = self.gate_proj.weight.split(4, dim=0)\n            y = F.linear(x, s[0])\n"
            "        else:\n            y = self.gate_up_proj(x)[0]\n        return y\n",
            _CLS + "        if self.config.pretraining_tp > 1:\n"
            "            raise ValueError(\"porter: this port does not run MLP.forward's arm for "
            "`self.config.pretraining_tp > 1` (it reads self.gate_proj, which the port replaced)\")\n"
            "\n    def forward(self, x):\n        y = self.gate_up_proj(x)[0]\n        return y\n",
        ),
    ]

    def leave_ClassDef(self, original, updated):
        super().leave_ClassDef(original, updated)
        if not self.kept(updated.name.value):
            return updated
        attrs = _init_attrs(updated)
        guards: list[cst.BaseStatement] = []
        body = []
        for fn in updated.body.body:
            if isinstance(fn, cst.FunctionDef) and fn.name.value == "forward":
                fn = self._forward(updated.name.value, fn, attrs, guards)
            body.append(fn)
        if not guards:
            return updated
        body = [append_to_init(fn, guards) if isinstance(fn, cst.FunctionDef) and fn.name.value == "__init__"
                else fn for fn in body]
        self.mark(f"{updated.name.value}.forward")
        return updated.with_changes(body=updated.body.with_changes(body=body))

    def _forward(self, cls: str, fn: cst.FunctionDef, attrs: set[str], guards: list) -> cst.FunctionDef:
        out: list[cst.BaseStatement] = []
        for st in fn.body.body:
            gone = self._missing(st, attrs) if isinstance(st, cst.If) and isinstance(st.orelse, cst.Else) else set()
            # the test must be one __init__ can evaluate: only `self.<attr set there>` and constants
            test_ok = isinstance(st, cst.If) and all(
                (a := self_attr(x)) is None or a in attrs
                for x in findall(st.test, m.Attribute(value=m.Name("self")))) and not (
                {n.value for n in findall(st.test, m.Name())} - {"self", "True", "False", "None"}  # type: ignore[attr-defined]
                - {x.attr.value for x in findall(st.test, m.Attribute())})  # type: ignore[attr-defined]
            if not gone or not test_ok:
                out.append(st)
                continue
            why = (f"porter: this port does not run {cls}.forward's arm for `{code(st.test)}` "  # type: ignore[attr-defined]
                   f"(it reads {', '.join(f'self.{a}' for a in sorted(gone))}, which the port replaced)")
            guards.append(cst.If(test=st.test, body=cst.IndentedBlock([cst.SimpleStatementLine([  # type: ignore[attr-defined]
                cst.Raise(cst.Call(cst.Name("ValueError"), [cst.Arg(cst.SimpleString(json.dumps(why)))]))])])))
            out.extend(st.orelse.body.body)  # type: ignore[attr-defined]
        return fn.with_changes(body=fn.body.with_changes(body=out))

    def _missing(self, st: cst.If, attrs: dict[str, str]) -> set[str]:
        """The `self.X` whose weights the `if` arm reads (`self.X.weight`) and __init__ no longer sets
        (the fused projections replaced them)."""
        out = set()
        for node in findall(st.body, m.Attribute(value=m.Attribute(value=m.Name("self")), attr=m.Name("weight"))):
            a = node.value.attr.value  # type: ignore[attr-defined]
            if a not in attrs:
                out.add(a)
        return out
