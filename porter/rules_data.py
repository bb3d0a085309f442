"""Load and validate the YAML tables under rules/ (one clear error when a table is malformed)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from porter.errors import PorterError

RULES_DIR = Path(__file__).resolve().parent.parent / "rules"


def active_rules_dir() -> Path:
    """rules/ beside the package, or the directory named by $PORTER_RULES_DIR (tests, overrides)."""
    env = os.environ.get("PORTER_RULES_DIR")
    return Path(env) if env else RULES_DIR


_STRIP_SCHEMA = {
    "strip_params": list,
    "rename_params": dict,
    "hf_only_callables": list,
    "drop_decorators": list,
    "base_classes": dict,
    "drop_methods": list,
    "drop_init_calls": list,
    "drop_init_attrs": list,
    "output_field": str,
    "cross_attention_flags": list,
    "transposed_linears": list,
    "engine_act_and_mul": list,
    "engine_add_norms": list,
    "latent_attention_model_types": list,
    "latent_decompressed_model_types": list,
    "absent_params": list,
    "false_flags": list,
    "rope_config_fields": list,
    "engine_state_layers": dict,
}
_TARGET_SCHEMA = {
    "package": str,
    "config_kwarg": str,
    "config_class": str,
    "plugin_group": str,
    "symbols": dict,
}


def _load(name: str, rules_dir: Path) -> dict:
    path = rules_dir / name
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PorterError(f"cannot read rules table: {exc.strerror}", file=str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        raise PorterError(
            "malformed YAML rules table",
            file=str(path),
            line=None if line is None else line + 1,
        ) from None
    if not isinstance(data, dict):
        raise PorterError("rules table must be a mapping at top level", file=str(path))
    return data


def _check(data: dict, schema: dict, path: Path, where: str = "") -> None:
    for key, typ in schema.items():
        if key not in data:
            raise PorterError(f"rules table lacks key {where}{key!r}", file=str(path))
        if not isinstance(data[key], typ):
            raise PorterError(
                f"rules table key {where}{key!r} must be a {typ.__name__}, "
                f"got {type(data[key]).__name__}",
                file=str(path),
            )
    for key in data:
        if key not in schema:
            raise PorterError(f"rules table has unknown key {where}{key!r}", file=str(path))


@dataclass(frozen=True)
class StripTable:
    strip_params: frozenset[str]
    rename_params: dict
    hf_only_callables: frozenset[str]
    drop_decorators: frozenset[str]
    base_classes: dict
    drop_methods: frozenset[str]
    drop_init_calls: frozenset[str]
    drop_init_attrs: frozenset[str]
    output_field: str
    cross_attention_flags: frozenset[str] = frozenset()
    transposed_linears: frozenset[str] = frozenset()
    engine_act_and_mul: frozenset[str] = frozenset()
    engine_add_norms: frozenset[str] = frozenset()  # engine norms taking the residual: norm(x, r) (PT330)
    latent_attention_model_types: frozenset[str] = frozenset()  # the engine runs its MLA layer for these
    latent_decompressed_model_types: frozenset[str] = frozenset()  # ... attention over decompressed k/v for these
    absent_params: frozenset[str] = frozenset()  # stripped inputs a plain generation never gives (None)
    false_flags: frozenset[str] = frozenset()  # stripped flags whose `else` arm the port's outputs follow
    rope_config_fields: frozenset[str] = frozenset()  # 4.x config fields transformers 5 keeps in rope_parameters
    engine_state_layers: dict = field(default_factory=dict)  # model type -> what the engine runs of its state layer


@dataclass(frozen=True)
class Target:
    name: str
    package: str
    config_kwarg: str
    config_class: str
    plugin_group: str
    symbols: dict  # neutral name -> "module:attr"


def strip_table(rules_dir: Path | None = None) -> StripTable:
    return _strip_table(rules_dir or active_rules_dir())


@lru_cache(maxsize=8)
def _strip_table(rules_dir: Path) -> StripTable:
    path = rules_dir / "hf_strip.yaml"
    data = _load("hf_strip.yaml", rules_dir)
    data.setdefault("latent_attention_model_types", [])
    data.setdefault("latent_decompressed_model_types", [])
    data.setdefault("absent_params", [])
    data.setdefault("false_flags", [])
    data.setdefault("rope_config_fields", [])
    data.setdefault("engine_state_layers", {})
    data.setdefault("engine_add_norms", [])
    _check(data, _STRIP_SCHEMA, path)
    for key in ("strip_params", "hf_only_callables", "drop_decorators", "drop_methods", "cross_attention_flags",
                "transposed_linears", "engine_act_and_mul", "engine_add_norms", "absent_params", "false_flags", "rope_config_fields"):
        if not all(isinstance(x, str) for x in data[key]):
            raise PorterError(f"rules table key {key!r} must list strings", file=str(path))
    return StripTable(
        strip_params=frozenset(data["strip_params"]),
        rename_params=dict(data["rename_params"]),
        hf_only_callables=frozenset(data["hf_only_callables"]),
        drop_decorators=frozenset(data["drop_decorators"]),
        base_classes=dict(data["base_classes"]),
        drop_methods=frozenset(data["drop_methods"]),
        drop_init_calls=frozenset(data["drop_init_calls"]),
        drop_init_attrs=frozenset(data["drop_init_attrs"]),
        output_field=data["output_field"],
        cross_attention_flags=frozenset(data["cross_attention_flags"]),
        transposed_linears=frozenset(data["transposed_linears"]),
        engine_act_and_mul=frozenset(data["engine_act_and_mul"]),
        engine_add_norms=frozenset(data["engine_add_norms"]),
        latent_attention_model_types=frozenset(data["latent_attention_model_types"]),
        latent_decompressed_model_types=frozenset(data["latent_decompressed_model_types"]),
        absent_params=frozenset(data["absent_params"]),
        false_flags=frozenset(data["false_flags"]),
        rope_config_fields=frozenset(data["rope_config_fields"]),
        engine_state_layers=dict(data["engine_state_layers"]),
    )


def targets(rules_dir: Path | None = None) -> dict[str, Target]:
    return _targets(rules_dir or active_rules_dir())


@lru_cache(maxsize=8)
def _targets(rules_dir: Path) -> dict[str, Target]:
    path = rules_dir / "targets.yaml"
    data = _load("targets.yaml", rules_dir)
    out = {}
    for name, spec in sorted(data.items()):
        if not isinstance(spec, dict):
            raise PorterError(f"target {name!r} must be a mapping", file=str(path))
        _check(spec, _TARGET_SCHEMA, path, where=f"{name}.")
        for sym, ref in spec["symbols"].items():
            if not isinstance(ref, str) or ":" not in ref:
                raise PorterError(
                    f"target {name!r} symbol {sym!r} must be 'module:attr', got {ref!r}",
                    file=str(path),
                )
        out[name] = Target(name=name, **spec)
    return out


def get_target(name: str) -> Target:
    all_targets = targets()
    if name not in all_targets:
        raise PorterError(
            f"unknown target {name!r} (known: {', '.join(sorted(all_targets))})",
            construct="--target",
        )
    return all_targets[name]


LORA_RULES = "lora.yaml"  # rules/: the model types whose native class takes LoRA adapters (PT322)
_LORA_ROLES = ("input_embeddings", "output_embeddings")


@lru_cache(maxsize=4)
def _lora_table(rules_dir: Path) -> dict[str, tuple[str, ...]]:
    path = rules_dir / LORA_RULES
    table = _load(LORA_RULES, rules_dir).get("lora") or {}
    if not isinstance(table, dict) or not all(
            isinstance(v, list) and set(v) <= set(_LORA_ROLES) for v in table.values()):
        raise PorterError(f"lora must map model types to lists of {_LORA_ROLES}", file=str(path), construct="lora")
    return {str(k): tuple(v) for k, v in table.items()}


def lora_roles(model_type: str) -> tuple[str, ...] | None:
    """The embedding roles the native class of MODEL_TYPE names for LoRA (rules/lora.yaml), None
    when that class takes no LoRA adapters."""
    return _lora_table(active_rules_dir()).get(model_type)


EAGLE3_RULES = "eagle3.yaml"  # rules/: the model types whose native class is an EAGLE-3 target (PT333)


@lru_cache(maxsize=4)
def _eagle3_table(rules_dir: Path) -> frozenset[str]:
    table = _load(EAGLE3_RULES, rules_dir).get("eagle3") or []
    if not isinstance(table, list) or not all(isinstance(v, str) for v in table):
        raise PorterError("eagle3 must list model types", file=str(rules_dir / EAGLE3_RULES), construct="eagle3")
    return frozenset(table)


def eagle3_target(model_type: str) -> bool:
    """Whether the native class of MODEL_TYPE is an EAGLE-3 target (rules/eagle3.yaml)."""
    return model_type in _eagle3_table(active_rules_dir())


COVERAGE_RULES = "coverage.yaml"  # rules/: the day-zero releases the sweep also covers


def day_zero_releases() -> list[str]:
    """The newer transformers releases `porter coverage` also sweeps (rules/coverage.yaml,
    ``day_zero_releases``): a model type only such a release has is a day-zero port. The
    release matrix (`porter regen`'s DRIFT.md) and the reference venvs (porter/verify/hfenv.py)
    cover them too."""
    path = active_rules_dir() / COVERAGE_RULES
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError:
        return []
    except yaml.YAMLError:
        raise PorterError("malformed YAML rules table", file=str(path)) from None
    rel = data.get("day_zero_releases") or []
    if not isinstance(rel, list) or not all(isinstance(v, str) and v.strip() for v in rel):
        raise PorterError("day_zero_releases must be a list of version strings", file=str(path),
                          construct="day_zero_releases")
    return [v.strip() for v in rel]
