"""PT144 config-layer-count: the rule `ConfigLayerCount`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import findall
from porter.config_names import LAYER_COUNT_NAMES
from porter.passes.base import Example
from porter.passes.config._common import ConfigRule



def _self_fields(cls: cst.ClassDef) -> set[str]:
    return {t.target.attr.value for t in findall(cls, m.AssignTarget(  # type: ignore[attr-defined]
        target=m.Attribute(value=m.Name("self"))))}


def _attribute_map(cls: cst.ClassDef) -> cst.Assign | None:
    for st in cls.body.body:
        if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name("attribute_map"))],
                                                              value=m.Dict())])):
            return st.body[0]  # type: ignore[attr-defined,return-value]
    return None


class ConfigLayerCount(ConfigRule):
    code = "PT144"
    name = "config-layer-count"
    why = (
        "The engine reads a model's layer count as `config.num_hidden_layers` (to size its caches and "
        "split the layers over pipeline stages). A remote-code config that calls it otherwise (ChatGLM's "
        "`num_layers`) and maps nothing to it would make the engine fail on the checkpoint; the shipped "
        "config class gains `attribute_map = {\"num_hidden_layers\": \"num_layers\"}` (merged into its own "
        "map when it has one), so both names read the same field."
    )
    examples = [
        Example(
            "class AConfig(PretrainedConfig):\n    model_type = \"a\"\n\n"
            "    def __init__(self, num_layers=2, **kwargs):\n        self.num_layers = num_layers\n",
            "class AConfig(PretrainedConfig):\n    model_type = \"a\"\n"
            "    attribute_map = {\"num_hidden_layers\": \"num_layers\"}\n\n"
            "    def __init__(self, num_layers=2, **kwargs):\n        self.num_layers = num_layers\n",
        ),
        Example(  # its own map gains the entry
            "class AConfig(PretrainedConfig):\n    attribute_map = {\"max_position_embeddings\": \"seq_length\"}\n\n"
            "    def __init__(self, num_layers=2, **kwargs):\n        self.num_layers = num_layers\n",
            "class AConfig(PretrainedConfig):\n    attribute_map = {\"max_position_embeddings\": \"seq_length\", "
            "\"num_hidden_layers\": \"num_layers\"}\n\n"
            "    def __init__(self, num_layers=2, **kwargs):\n        self.num_layers = num_layers\n",
        ),
        Example(  # must leave unchanged: the config says num_hidden_layers itself
            "class AConfig(PretrainedConfig):\n    def __init__(self, num_hidden_layers=2, num_layers=1, **kwargs):\n"
            "        self.num_hidden_layers = num_hidden_layers\n        self.num_layers = num_layers\n",
            "class AConfig(PretrainedConfig):\n    def __init__(self, num_hidden_layers=2, num_layers=1, **kwargs):\n"
            "        self.num_hidden_layers = num_hidden_layers\n        self.num_layers = num_layers\n",
        ),
    ]

    def leave_ClassDef(self, original, updated):
        self.scope.pop()
        fields = _self_fields(updated)
        amap = _attribute_map(updated)
        mapped = {e.key.evaluated_value for e in (amap.value.elements if amap else [])  # type: ignore[attr-defined]
                  if isinstance(e, cst.DictElement) and isinstance(e.key, cst.SimpleString)}
        if "num_hidden_layers" in fields or "num_hidden_layers" in mapped:
            return updated
        name = next((n for n in LAYER_COUNT_NAMES if n in fields), None)
        if name is None:
            return updated
        entry = cst.DictElement(cst.SimpleString('"num_hidden_layers"'), cst.SimpleString(f'"{name}"'))
        self.mark(updated.name.value)
        if amap is not None:
            new = amap.with_changes(value=amap.value.with_changes(elements=[*amap.value.elements, entry]))  # type: ignore[attr-defined]
            return updated.deep_replace(amap, new)  # type: ignore[return-value]
        line = cst.SimpleStatementLine(body=[cst.Assign(targets=[cst.AssignTarget(cst.Name("attribute_map"))],
                                                        value=cst.Dict(elements=[entry]))])
        body = list(updated.body.body)
        at = next((i + 1 for i, st in enumerate(body) if m.matches(st, m.SimpleStatementLine(body=[m.Assign(
            targets=[m.AssignTarget(m.Name("model_type"))])]))), 0)
        return updated.with_changes(body=updated.body.with_changes(body=[*body[:at], line, *body[at:]]))
