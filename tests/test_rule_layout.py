"""The layout of porter/passes: one rule per file, the file named after the rule, grouped in family
folders; and one pipeline that lists every rule porter ships exactly once."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

from porter.passes import REGISTRY, Rule
from porter.passes.pipeline import NOT_IN_PIPELINE, PIPELINE, STAGES

PASSES_DIR = Path(__file__).resolve().parent.parent / "porter" / "passes"
FAMILIES = sorted(p for p in PASSES_DIR.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
RULE_FILES = sorted(f for d in FAMILIES for f in d.glob("*.py") if not f.name.startswith("_"))
PRIVATE_FILES = sorted(f for d in FAMILIES for f in d.glob("_*.py") if f.name != "__init__.py")


def _module(path: Path):
    rel = path.relative_to(PASSES_DIR.parent.parent).with_suffix("")
    return importlib.import_module(".".join(rel.parts))


def _own_rules(module) -> list[type[Rule]]:
    """The Rule subclasses with a code that the module itself defines (not those it imports)."""
    return [c for _, c in inspect.getmembers(module, inspect.isclass)
            if issubclass(c, Rule) and c.code and c.__module__ == module.__name__]


def test_families_hold_the_rules():
    assert {d.name for d in FAMILIES} >= {"attention", "rope", "mlp", "moe", "norms", "tp", "plumbing",
                                          "cleanup", "config"}
    assert len(RULE_FILES) == len(PIPELINE)


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_one_rule_per_file_named_after_it(path):
    rules = _own_rules(_module(path))
    assert len(rules) == 1, f"{path.name}: {len(rules)} rules ({[r.code for r in rules]}), want one"
    rule = rules[0]
    assert rule.name.replace("-", "_") == path.stem, f"{path.name} holds {rule.code} {rule.name}"


@pytest.mark.parametrize("path", PRIVATE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shared_modules_hold_no_rule(path):
    assert _own_rules(_module(path)) == [], f"{path}: a rule belongs in its own file"


def test_no_rule_outside_the_family_folders():
    for path in PASSES_DIR.glob("*.py"):
        assert _own_rules(_module(path)) == [], f"{path.name}: a rule belongs in a family folder"


def test_pipeline_lists_every_shipped_rule_once():
    codes = [r.code for r in PIPELINE]
    assert len(codes) == len(set(codes)), "a rule is listed twice"
    assert sum(len(rules) for rules in STAGES.values()) == len(PIPELINE)
    shipped = {r for r in REGISTRY.values() if r.__module__.startswith("porter.passes.")}
    missing = {r.code for r in shipped - set(PIPELINE)} - set(NOT_IN_PIPELINE)
    assert not missing, f"registered but in no stage of the pipeline (say why in NOT_IN_PIPELINE): {missing}"
    assert set(PIPELINE) <= shipped
    for code, why in NOT_IN_PIPELINE.items():
        assert code in REGISTRY and len(why) > 20, code


def test_rules_with_unchanged_examples_leave_them_unchanged():
    """The "must leave unchanged" examples (after == before) are checked like the others (in
    test_rule_examples); a few rules carry them where a rewrite would otherwise be tempting."""
    guarded = {r.code for r in REGISTRY.values() for ex in r.examples if ex.before == ex.after}
    assert {"PT023", "PT024", "PT125", "PT152"} <= guarded
