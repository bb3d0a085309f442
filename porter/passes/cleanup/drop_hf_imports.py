"""PT001 drop-hf-imports: the rule `DropHfImports`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import dotted, findall
from porter.passes.base import Example, Rule


class DropHfImports(Rule):
    code = "PT001"
    name = "drop-hf-imports"
    why = (
        "A port must import under the engine without transformers' private modules: relative "
        "imports (`from ...cache_utils import Cache`), the module logger and `__all__` go, and so "
        "do module-level calls on an object HF imports (transformers 4.x's "
        "`ALL_LAYERNORM_LAYERS.append(LlamaRMSNorm)` registers a class in HF's own list); the "
        "imports the port needs are added back from the target's symbol map by engine-imports."
    )
    examples = [
        Example(
            "import torch\nfrom ...cache_utils import Cache\nlogger = logging.get_logger(__name__)\n"
            "__all__ = ['A']\n",
            "import torch\n",
        ),
        Example(  # a check that only warns (remote code) goes like one that only logs
            "import warnings\nclass A(nn.Module):\n    def forward(self, x, **kwargs):\n"
            "        if 'padding_mask' in kwargs:\n            warnings.warn('deprecated')\n"
            "        return x\n",
            "import warnings\nclass A(nn.Module):\n    def forward(self, x, **kwargs):\n"
            "        return x\n",
        ),
        Example(
            "from ...pytorch_utils import ALL_LAYERNORM_LAYERS\nclass N(nn.Module):\n    pass\n"
            "ALL_LAYERNORM_LAYERS.append(N)\n",
            "class N(nn.Module):\n    pass\n",
        ),
    ]

    def leave_ImportFrom(self, original, updated):
        mod = dotted(updated.module) or ""
        if updated.relative or mod.split(".")[0] == "transformers":
            if not isinstance(updated.names, cst.ImportStar):
                for alias in updated.names:
                    local = alias.asname.name if alias.asname else alias.name
                    self.ctx.removed_names.add(dotted(local) or "")  # type: ignore[arg-type]
            return cst.RemoveFromParent()
        return updated

    def leave_Param(self, original, updated):
        # `config: LlamaConfig` -> `config`: the HF config class is not imported by the port
        if updated.annotation is not None and {
            n.value for n in findall(updated.annotation, m.Name())  # type: ignore[attr-defined]
        } & self.ctx.removed_names:
            return updated.with_changes(annotation=None)
        return updated

    def _logs(self, node: cst.CSTNode) -> bool:
        """A statement that reports: HF's logger, or the warnings module (remote code's
        `if "padding_mask" in kwargs: warnings.warn(...)` reads an argument the port drops)."""
        return bool(findall(node, m.Call(func=m.Attribute(value=m.Name("logger"))
                                         | m.Attribute(value=m.Name("warnings"), attr=m.Name("warn")))))

    def leave_If(self, original, updated):
        # `if cond: logger.warning(...)`: the HF logger is not part of the port
        if all(self._logs(s) for s in original.body.body) and original.orelse is None:
            return cst.RemoveFromParent()
        # module level `if is_flash_attn_available(): ...`: HF's optional-backend imports
        if not self.scope and {n.value for n in findall(original.test, m.Name())} & self.ctx.removed_names:  # type: ignore[attr-defined]
            return cst.RemoveFromParent()
        return updated

    def leave_SimpleStatementLine(self, original, updated):
        if m.matches(updated, m.SimpleStatementLine(body=[m.Expr()])) and self._logs(updated):
            return cst.RemoveFromParent()
        if self.scope:
            return updated
        # `ALL_LAYERNORM_LAYERS.append(N)`: a call on an object imported from transformers only
        # registers something in HF's own state; its value is discarded
        if m.matches(updated, m.SimpleStatementLine(body=[m.Expr(m.Call(func=m.Attribute(value=m.Name())))])):
            recv = updated.body[0].value.func.value.value  # type: ignore[attr-defined]
            if recv in self.ctx.removed_names:
                return cst.RemoveFromParent()
        if m.matches(
            updated,
            m.SimpleStatementLine(
                body=[m.Assign(targets=[m.AssignTarget(target=m.Name("logger") | m.Name("__all__"))])]
            ),
        ):
            return cst.RemoveFromParent()
        return updated
