"""Issue 23: the committed ports of remote code, verified in the real engine at TP=1 and TP=2.

They live in generated/remote/<target>/<model_type>/ (each PORT.json records the repository
folder it came from, tests/fixtures/remote/<style>): `porter regen` and coverage, which
regenerate ports from transformers, leave them alone; `porter regen --check` converts each again
from its folder and compares byte for byte. Their verdicts are kept in generated/remote/verdicts/.
Which ones the engine runs here: every port without a valid verdict, plus one of the others drawn
with the run's PORTER_VERDICT_SEED (all of them with PORTER_VERIFY_ALL=1), as
tests/test_verify_harness.py does for the transformers ports.
"""

from __future__ import annotations

import random

import pytest

from conftest import GENERATED, ROOT, verify_plan
from porter.layout import PortInfo
from porter.verify import THRESHOLD, render_report, run_verify
from porter.verify.remote_side import NOTICE
from porter.verify.verdicts import status as verdict_status

PORTS = GENERATED / "remote" / "vllm"
MODELS = sorted(p.name for p in PORTS.iterdir() if (p / "PORT.json").is_file()) if PORTS.is_dir() else []
FIXTURES = ROOT / "tests" / "fixtures" / "remote"


def _selection() -> list[str]:
    plan = verify_plan()
    status = {m: verdict_status(PORTS / m) for m in MODELS}
    valid = sorted(m for m, s in status.items() if s == "valid")
    if plan["all"]:
        return MODELS
    sampled = random.Random(plan["seed"]).sample(valid, min(1, len(valid)))
    return sorted({m for m, s in status.items() if s != "valid"} | set(sampled))


def test_every_remote_port_records_its_fixture_folder():
    assert MODELS, "no committed remote-code port"
    for m in MODELS:
        info = PortInfo.load(PORTS / m)
        folder = ROOT / info.remote["folder"]
        assert folder.parent == FIXTURES, info.remote
        assert sorted(info.remote["files"]) == sorted(
            p.name for p in folder.iterdir() if p.suffix == ".py" or p.name == "config.json")
        assert info.config_class and info.config_model_type == m  # the port ships the config class


@pytest.mark.e2e
@pytest.mark.parametrize("model_type", _selection())
def test_remote_port_matches_its_hf_code_at_tp1_and_tp2(model_type):
    port_dir = PORTS / model_type
    said = []
    report = run_verify(port_dir, tps=[1, 2], progress=said.append)
    text = render_report(report, json=False)
    assert report.exit_code == 0, text
    assert any(s.startswith(NOTICE) for s in said), said  # it says it runs the model's code
    assert report.hf_side.startswith("remote code, in a subprocess"), report.hf_side
    assert [r.tp for r in report.results] == [1, 2]
    for r in report.results:
        c = r.port.comparison
        assert c is not None and c.max_delta <= THRESHOLD and c.tokens_equal, text
        assert r.class_ok and r.port.unfilled == [], text
    assert report.verdict == f"generated/remote/verdicts/vllm/{model_type}.json", report.verdict
    assert verdict_status(port_dir) == "valid"
