"""PT340 config-property: the rule `ConfigProperty`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst

from porter.analysis.config_properties import ConfigGetter
from porter.analysis.cstutil import dotted
from porter.errors import PorterError
from porter.passes.base import Example, Rule

PREFIX = "config_"  # the function's name: the property's, after this

_PROP = ConfigGetter(cls="AConfig", name="kv_modes", params="self", line=3, calls=(), reads=("n", "shared"),
             body='first = self.n - self.shared\nreturn [None if i < first else "reuse" for i in range(self.n)]')
_BEFORE = (
    "class Layer(nn.Module):\n    def __init__(self, config, i):\n"
    "        self.shared = config.kv_modes[i] == 'reuse'\n"
)
_AFTER = (
    "class Layer(nn.Module):\n    def __init__(self, config, i):\n"
    "        self.shared = config_kv_modes(config)[i] == 'reuse'\n\n\n"
    "def config_kv_modes(config):\n"
    '    """AConfig.kv_modes of the source\'s transformers, a property the engine\'s AConfig lacks."""\n'
    "    first = config.n - config.shared\n"
    '    return [None if i < first else "reuse" for i in range(config.n)]\n'
)


class _Reads(cst.CSTTransformer):
    """`<a config>.P` of a missing property P -> `config_P(<the config>)`, recording each P it calls."""

    def __init__(self, missing) -> None:
        super().__init__()
        self.missing, self.used = missing, []

    def leave_Attribute(self, original, updated):
        if updated.attr.value in self.missing and (dotted(updated.value) or "").split(".")[-1].endswith("config"):
            self.used.append(updated.attr.value)
            return cst.Call(func=cst.Name(PREFIX + updated.attr.value), args=[cst.Arg(updated.value)])
        return updated


class _Rename(cst.CSTTransformer):
    """The getter's own parameter (`self`) renamed `config`."""

    def __init__(self, me: str) -> None:
        super().__init__()
        self.me = me

    def leave_Name(self, original, updated):
        return updated.with_changes(value="config") if updated.value == self.me else updated


class ConfigProperty(Rule):
    code = "PT340"
    name = "config-property"
    descend_methods = frozenset()
    why = (
        "A newer transformers release can make a config class compute what its modeling file reads "
        "(5.25's `kv_sharing_modes` of the Gemma 4 configs, each layer's KV-sharing role from "
        "num_kv_shared_layers and layer_types). The engine reads config.json with its own "
        "transformers' class of the same name, which has no such property (config.json holds only "
        "the fields), so `config.kv_sharing_modes` would fail in the engine. The getter, read from "
        "the source release's configuration file (porter/analysis/config_properties.py), becomes a "
        "function of the config in the port, `config_kv_sharing_modes(config)`, computing the same "
        "from the same fields. A getter that calls the config's methods or reads its private state "
        "is refused."
    )
    examples = [Example(_BEFORE, _AFTER, seed={"config_properties": {"kv_modes": _PROP}})]

    @classmethod
    def applies(cls, ctx) -> bool:
        return bool(ctx.config_properties)

    def leave_Module(self, original, updated):
        props = self.ctx.config_properties
        reads = _Reads(props)
        new = updated.visit(reads)
        helpers, done = [], set()
        while reads.used:  # what the module calls, then what those functions call
            name = reads.used.pop(0)
            if name in done:
                continue
            done.add(name)
            prop = props[name]
            if prop.calls or any(r.startswith("_") for r in prop.reads):
                raise PorterError(
                    f"cannot port {prop.cls}.{name}, a config property the engine's transformers lacks: "
                    f"its getter {'calls ' + ', '.join(prop.calls) if prop.calls else 'reads private state'}",
                    file=prop.path or None, line=prop.line, rule=self.name)
            fn = cst.parse_module(
                f"def {PREFIX}{name}(config):\n"
                f'    """{prop.cls}.{name} of the source\'s transformers, a property the engine\'s '
                f'{prop.cls} lacks."""\n'
                + "".join(f"    {ln}\n" if ln else "\n" for ln in prop.body.splitlines())).body[0]
            helpers.append(fn.visit(_Rename(prop.params)).visit(reads).with_changes(
                leading_lines=[cst.EmptyLine(), cst.EmptyLine()]))
            self.mark(f"{PREFIX}{name}")
        return new.with_changes(body=[*new.body, *helpers]) if helpers else updated
