"""PT141 config-engine-imports: the rule `ConfigEngineImports`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst

from porter.passes.base import Example
from porter.passes.config._common import ConfigRule

# decorators that only document (dropped: the engine's transformers need not have them)
DOC_DECORATORS = frozenset({"auto_docstring"})


def _absolute(module: cst.ImportFrom, package: str) -> str | None:
    """`from ...utils import x` inside transformers.models.<m> -> "transformers.utils"."""
    dots = len(module.relative)
    if not dots:
        return None
    parts = package.split(".")
    if dots > len(parts):
        return None
    base = parts[: len(parts) - dots + 1]
    tail = cst.Module([]).code_for_node(module.module) if module.module is not None else ""
    return ".".join(base + ([tail] if tail else []))



class ConfigEngineImports(ConfigRule):
    code = "PT141"
    name = "config-engine-imports"
    why = (
        "A shipped config module lives in the port's package, not in transformers: its relative "
        "imports (`from ...configuration_utils import PreTrainedConfig`) become absolute imports of "
        "the engine's transformers (`from transformers.configuration_utils import ...`), and "
        "decorators that only write documentation (`@auto_docstring`) are dropped. Whether each "
        "imported name exists in the engine's transformers is checked statically afterwards; a "
        "newer helper it lacks is reported with its line."
    )
    examples = [
        Example(
            "from ...configuration_utils import PreTrainedConfig\nfrom ...utils import auto_docstring\n"
            "\n\n@auto_docstring(checkpoint=\"a/a\")\n@strict\nclass AConfig(PreTrainedConfig):\n"
            "    model_type = \"a\"\n",
            "from transformers.configuration_utils import PreTrainedConfig\n"
            "from transformers.utils import auto_docstring\n"
            "\n\n@strict\nclass AConfig(PreTrainedConfig):\n    model_type = \"a\"\n",
        )
    ]

    def leave_ImportFrom(self, original, updated):
        target = _absolute(updated, self.cctx.module_package)
        if target is None:
            return updated
        return updated.with_changes(relative=[], module=cst.parse_expression(target))

    def leave_Decorator(self, original, updated):
        fn = updated.decorator.func if isinstance(updated.decorator, cst.Call) else updated.decorator
        name = fn.attr.value if isinstance(fn, cst.Attribute) else getattr(fn, "value", None)
        if name in DOC_DECORATORS:
            return cst.RemoveFromParent()
        return updated

