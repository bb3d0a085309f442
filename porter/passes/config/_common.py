"""What the rules over a shipped configuration module share: their context and base class.

These rules rewrite a release's `configuration_<model_type>.py` (read statically) into the module a
day-zero port ships; porter/config_port.py decides when to ship one and runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import libcst as cst

from porter.passes.base import Rule


@dataclass
class ConfigContext:
    """What the config rules need: the classes to keep and the engine's transformers tree."""

    keep: set[str]
    engine_root: Path | None
    module_package: str = ""  # e.g. transformers.models.apertus1p5 (for relative imports)
    problems: list[tuple[int, str]] = field(default_factory=list)  # (line in the source, what)



class ConfigRule(Rule):
    """A rule over a configuration module (not the modeling file): its examples run on their own."""

    descends = True

    def __init__(self, ctx: ConfigContext) -> None:  # type: ignore[override]
        cst.CSTTransformer.__init__(self)
        self.cctx = ctx
        self.scope = []
        self.changed = False

    def visit_ClassDef(self, node):
        self.scope.append(node.name.value)
        return True

    def visit_FunctionDef(self, node):
        self.scope.append(node.name.value)
        return True

    def mark(self, scope: str | None = None) -> None:
        self.changed = True

    @classmethod
    def example_context(cls) -> ConfigContext:
        """The context the examples run in: a module `transformers.models.a` whose class AConfig is kept."""
        return ConfigContext(keep={"AConfig"}, engine_root=None, module_package="transformers.models.a")

    def rewrite(self, module: cst.Module) -> cst.Module:
        return module.visit(self)

