"""porter diff and porter rules: every hunk of every committed port is labelled with a recorded rule
that the catalogue lists; the HTML page works in a real (headless) Chromium; a newly registered rule
shows up in the catalogue and in the example test with no other edit."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import GENERATED, MODELS, ROOT, TARGETS, run_porter
from porter.diff import diff_targets, render_html, render_text
from porter.passes import REGISTRY, Example, Rule

PORTS = [pytest.param(t, m, id=f"{t}-{m}") for m in MODELS for t in TARGETS]  # a model's ports side by side
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "artifacts"


@pytest.fixture(scope="module")
def catalogue() -> dict[str, dict]:
    """What `porter rules` lists, read from the command itself."""
    proc = run_porter("rules", "--json")
    assert proc.returncode == 0, proc.stderr
    return {r["code"]: r for r in json.loads(proc.stdout)}


_diffs: dict[tuple[str, str], object] = {}


def port_diff(target: str, model: str):
    """The diff of a committed port; a model's ports of every target are diffed together (one
    analysis, the shared rewrite passes once), as both of its tests ask for each. porter diff
    refuses a committed port any file of which differs from what porter generates now: this is
    the suite's `regen --check` of the transformers ports (tests/test_regen.py checks the rest)."""
    if (target, model) not in _diffs:
        for d in diff_targets(str(GENERATED / target / model), TARGETS):
            _diffs[d.target, model] = d
    return _diffs[target, model]


def removing_rules() -> set[str]:
    """Rules whose own examples remove a top-level definition (read from the rule classes)."""
    def tops(text: str) -> set[str]:
        return {n.name for n in ast.parse(text).body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}

    return {r.code for r in REGISTRY.values() for ex in r.examples if tops(ex.before) - tops(ex.after)}


@pytest.mark.parametrize("target,model", PORTS)
def test_every_hunk_carries_a_listed_rule(target, model, catalogue):
    d = port_diff(target, model)
    assert d.hunks, f"{target}/{model}: no hunks"
    assert d.target == target
    gaps = [h.scope for h in d.hunks if not h.codes]
    assert not gaps, f"{target}/{model}: hunks with no recorded rule (provenance gap) in scopes {gaps}"
    unlisted = {c for h in d.hunks for c in h.codes} - set(catalogue)
    assert not unlisted, f"rule codes not listed by `porter rules`: {unlisted}"
    # the causal LM keeps its HF name and is diffed against itself
    assert any(h.scope.startswith(f"{d.hf_class}.") and h.kind == "changed" for h in d.hunks)


@pytest.mark.parametrize("target,model", PORTS)
def test_removed_definitions_carry_the_rule_that_removed_them(target, model):
    """A top-level class or function the port drops is labelled (from the provenance recorded at
    its own scope) with a rule that removes definitions; anything else is a provenance gap."""
    d = port_diff(target, model)
    removers = removing_rules()
    assert removers, "no rule's examples remove a top-level definition"
    removed = [h for h in d.hunks if h.kind == "removed" and "." not in h.scope and h.scope != "<module>"]
    assert removed, f"{target}/{model}: the port removes nothing?"
    gaps = {h.scope: h.codes for h in removed if not set(h.codes) & removers}
    assert not gaps, (
        f"{target}/{model}: removed definitions whose scope records no removing rule "
        f"({sorted(removers)}): {gaps}"
    )


def test_cli_text_json_and_plain_when_piped(tmp_path):
    proc = run_porter("diff", "opt", "--target", "vllm")
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[" not in proc.stdout  # piped: no colour codes
    assert "=== OPTAttention.__init__" in proc.stdout and "PT023 fuse-qkv" in proc.stdout
    proc = run_porter("diff", "opt", "--json", "--html", str(tmp_path / "d.html"))
    assert proc.returncode == 0, proc.stderr
    hunks = json.loads(proc.stdout)
    assert hunks and all({"scope", "rules", "lines"} <= set(h) for h in hunks)
    assert all(r.keys() == {"code", "name"} for h in hunks for r in h["rules"])
    assert (tmp_path / "d.html").read_text().startswith("<!DOCTYPE html>")
    bad = run_porter("diff", "opt", "--target", "nope")
    assert bad.returncode == 2 and bad.stderr.startswith("porter: error:")


def test_terminal_output_is_coloured():
    from rich.console import Console

    from porter.diff import print_rich

    console = Console(force_terminal=True, color_system="standard", width=120, record=True)
    with console.capture() as cap:
        print_rich(port_diff("vllm", "opt"), console)
    out = cap.get()
    assert "\x1b[31m" in out and "\x1b[32m" in out  # red removals, green additions


def test_stale_port_is_refused(tmp_path):
    import shutil

    port = tmp_path / "opt"
    shutil.copytree(GENERATED / "vllm" / "opt", port)
    mod = port / "porter_vllm_opt" / "modeling_opt.py"
    mod.write_text(mod.read_text() + "\n# edited\n")
    proc = run_porter("diff", str(port))
    assert proc.returncode == 2 and "differs from what porter generates" in proc.stderr


def test_html_is_self_contained():
    page = render_html(port_diff("vllm", "llama"))
    assert "<script" not in page and "http://" not in page and "https://" not in page.split("</style>")[0]
    assert "<link" not in page and "src=" not in page
    for code in port_diff("vllm", "llama").rule_codes():
        assert f"href='#rule-{code}'" in page and f"id='rule-{code}'" in page


# -- the page in a real browser ---------------------------------------------------------------

def test_html_in_headless_chromium(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    assert Path(CHROMIUM).is_file(), "chromium missing: `make setup` installs it (apt-get install chromium)"
    d = port_diff("vllm", "opt")
    page_path = tmp_path / "diff.html"
    page_path.write_text(render_html(d))
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.as_uri())
            page.screenshot(path=str(ARTIFACTS / "diff.png"))  # the top: title, first hunks, labels
            hunks = page.locator("div.hunk")
            assert hunks.count() == len(d.hunks)
            expect(hunks.first).to_be_visible()
            # side by side: HF on the left, the port on the right
            head = hunks.first.locator("th")
            assert head.nth(1).inner_text() == "Hugging Face" and head.nth(3).inner_text() == "port"
            assert hunks.first.locator("td.del").count() and hunks.first.locator("td.add").count()
            labels = page.locator("a.rule")
            assert labels.count() == sum(len(h.rules) for h in d.hunks)
            qkv = page.locator("a.rule[href='#rule-PT023']")
            assert qkv.count() >= 1
            qkv.first.scroll_into_view_if_needed()
            assert qkv.first.is_visible() and qkv.first.inner_text() == "PT023"
            assert page.locator("text=NO RECORDED RULE").count() == sum(not h.rules for h in d.hunks)
            section = page.locator("#rule-PT023")
            expect(section).not_to_be_in_viewport()
            qkv.first.click()
            assert page.url.endswith("#rule-PT023")
            expect(section).to_be_visible()
            expect(section).to_be_in_viewport()
            assert "fuse-qkv" in section.inner_text()
            assert REGISTRY["PT023"].why.split("`")[0].strip() in section.inner_text()
            page.screenshot(path=str(ARTIFACTS / "diff-rule.png"))
            assert all(u.startswith("file://") for u in requests), requests
        finally:
            browser.close()
    assert (ARTIFACTS / "diff.png").stat().st_size > 10_000


# -- a rule added with its examples needs no other edit --------------------------------------

THROWAWAY = '''
import libcst as cst
from porter.passes import Example, Rule


class ThrowawayRenameFoo(Rule):
    code = "PT999"
    name = "throwaway-rename-foo"
    why = "A throwaway rule for the catalogue test: renames every `foo` to `bar` so the test sees it run."
    examples = [Example("x = foo(1)\\n", "x = bar(1)\\n")]

    def leave_Name(self, original, updated):
        return updated.with_changes(value="bar") if updated.value == "foo" else updated
'''


@pytest.fixture
def throwaway_rule():
    ns: dict = {}
    exec(compile(textwrap.dedent(THROWAWAY), "<throwaway>", "exec"), ns)
    rule = ns["ThrowawayRenameFoo"]
    try:
        yield rule
    finally:
        REGISTRY.pop(rule.code, None)
    assert "PT999" not in REGISTRY


def test_registered_rule_appears_everywhere(throwaway_rule, tmp_path):
    from typer.testing import CliRunner

    import test_rule_examples
    from porter.cli import app

    assert REGISTRY["PT999"] is throwaway_rule and issubclass(throwaway_rule, Rule)
    runner = CliRunner()
    listed = runner.invoke(app, ["rules"])
    assert listed.exit_code == 0, listed.output
    line = next(ln for ln in listed.output.splitlines() if ln.startswith("PT999"))
    assert "throwaway-rename-foo" in line and "1 example(s)" in line
    assert "renames every `foo` to `bar`" in listed.output
    one = runner.invoke(app, ["rules", "PT999"])
    assert one.exit_code == 0 and "x = foo(1)" in one.output and "x = bar(1)" in one.output
    # the one example test function runs it, unchanged
    ex = throwaway_rule.examples[0]
    assert isinstance(ex, Example)
    test_rule_examples.test_rule_example(throwaway_rule, 0, ex)
    test_rule_examples.test_every_rule_has_examples_and_a_why()
    # and pytest collects it from the registry like any other rule: a fresh run with the rule
    # registered by a plugin module (no edit to tests/test_rule_examples.py)
    (tmp_path / "throwaway_plugin.py").write_text(textwrap.dedent(THROWAWAY))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "throwaway_plugin", "-p", "no:cacheprovider",
         str(ROOT / "tests" / "test_rule_examples.py"), "-k", "PT999", "-rA"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASSED tests/test_rule_examples.py::test_rule_example[PT999-throwaway-rename-foo-0]" in proc.stdout


def test_plain_text_names_rules():
    text = render_text(port_diff("aphrodite", "opt"))
    assert text.startswith("--- HF ")
    assert "=== OPTForCausalLM.load_weights (added)" in text
