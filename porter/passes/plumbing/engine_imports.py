"""PT070 engine-imports: the rule `EngineImports`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, dotted, findall
from porter.passes.base import Example, Rule


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
        engine_names = {self.ctx.bound_name(s) for s in self.ctx.engine_symbols} & used
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
            if (bound := self.ctx.bound_name(sym)) in used:
                by_module.setdefault(mod, []).append(attr if bound == attr else f"{attr} as {bound}")
        for mod in sorted(by_module):
            header.append(cst.parse_statement(f"from {mod} import {', '.join(sorted(by_module[mod]))}\n"))
        # keep a leading docstring first
        doc = []
        if rest and m.matches(rest[0], m.SimpleStatementLine(body=[m.Expr(m.SimpleString())])):
            doc = [rest.pop(0)]
        self.mark("<module>")
        return updated.with_changes(body=[*doc, *header, *rest])
