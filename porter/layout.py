"""Where a port lives on disk and how it is named: shared by convert, verify and regen.

A port directory ``ROOT/<target>/<model_type>/`` holds::

    PORT.json                       provenance, file hashes, plan (see PortInfo)
    pyproject.toml                  the plugin package (entry point in the target's plugin group)
    porter_<target>_<model_type>/
        __init__.py                 register(): ModelRegistry.register_model(...)
        modeling_<model_type>.py    the port
        configuration_<model_type>.py  only for a model type the engine's transformers lacks
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

PORT_JSON = "PORT.json"
OPTIONAL_FIELDS = ("config_class", "config_model_type", "remote")


# Python's bytecode cache, written by any import of the port; nothing else is ignored (a build/ or
# *.egg-info left by installing the port is a difference: the port's flit_core build writes none)
IGNORED_PARTS = {"__pycache__"}
IGNORED_SUFFIXES = (".pyc",)


def port_files(port_dir: Path) -> dict[str, bytes]:
    """What a port directory holds (relpath -> bytes), Python's bytecode caches left out."""
    files = {}
    for p in sorted(Path(port_dir).rglob("*")):
        rel = p.relative_to(port_dir)
        if p.is_dir() or IGNORED_PARTS & set(rel.parts):
            continue
        if any(part.endswith(IGNORED_SUFFIXES) for part in rel.parts):
            continue
        files[rel.as_posix()] = p.read_bytes()
    return files


def files_differing(old: dict[str, bytes], new: dict[str, bytes]) -> list[str]:
    """The relpaths two port directories' files (port_files) do not share byte for byte."""
    return [rel for rel in sorted(set(old) | set(new)) if old.get(rel) != new.get(rel)]


def package_name(target: str, model_type: str) -> str:
    return f"porter_{target}_{model_type}"


def port_architecture(hf_architecture: str) -> str:
    """The port registers under its own name so the engine's native class can never stand in."""
    return f"Porter{hf_architecture}"


@dataclass
class PortInfo:
    target: str
    model_type: str
    architecture: str  # porter's registered name, e.g. PorterLlamaForCausalLM
    hf_architecture: str  # e.g. LlamaForCausalLM
    package: str  # e.g. porter_vllm_llama
    module: str  # e.g. porter_vllm_llama.modeling_llama
    plugin_group: str  # e.g. vllm.general_plugins
    source: str  # path of the HF file relative to the transformers package
    transformers_version: str
    source_sha256: str
    porter_version: str
    files: dict[str, str] = field(default_factory=dict)  # relpath -> sha256
    rules_applied: list[str] = field(default_factory=list)
    plan: dict = field(default_factory=dict)
    # a day-zero port ships the config class the engine's transformers lacks (omitted when empty)
    config_class: str = ""  # e.g. porter_vllm_dory.configuration_dory:DoryConfig
    config_model_type: str = ""  # the model_type its config.json names
    # a port of remote code (issue 23): {"folder": the repository folder (relative to porter's
    # repository when inside it), "files": {name: sha256}}, the source its HF reference runs
    remote: dict = field(default_factory=dict)
    path: Path | None = None  # the port directory (not serialised)

    @classmethod
    def load(cls, port_dir: Path) -> PortInfo:
        data = json.loads((Path(port_dir) / PORT_JSON).read_text())
        known = {f for f in cls.__dataclass_fields__ if f != "path"}
        info = cls(**{k: v for k, v in data.items() if k in known})
        info.path = Path(port_dir)
        return info

    def to_json(self) -> str:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "path"}
        for k in OPTIONAL_FIELDS:
            if not data[k]:
                del data[k]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"
