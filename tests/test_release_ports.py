"""Issue 22: ports of an older transformers release's modeling files (4.45.2, the style most remote
code was written in), kept beside the installed release's ports of the same model types.

They live in generated/releases/<version>/<target>/<model_type>/ with their verdicts in
generated/releases/<version>/verdicts/ (`porter verify` of such a port runs its HF reference in
that release's venv, .venv-transformers-<version>, built from nothing when missing). Here: each
converts again from the release's wheel to the committed bytes, and each has a valid verdict of
TP=1 and TP=2; a port without one is verified in the engine (all of them with PORTER_VERIFY_ALL=1),
so CI re-runs nothing for byte-identical inputs.
"""

from __future__ import annotations

import pytest

from conftest import GENERATED, verify_plan
from porter.layout import PortInfo
from porter.regen import _check_release, release_roots
from porter.verify import THRESHOLD, render_report, run_verify
from porter.verify.verdicts import status as verdict_status

ROOTS = release_roots(GENERATED)
PORTS = sorted(p for r in ROOTS for p in (r / "vllm").iterdir() if (p / "PORT.json").is_file())


def _selection() -> list:
    if verify_plan()["all"]:
        return PORTS
    return [p for p in PORTS if verdict_status(p) != "valid"]


def test_release_ports_of_transformers_4_45_2():
    names = {(r.name, p.name) for r in ROOTS for p in (r / "vllm").iterdir()}
    # issue 22: the six model types of transformers 4.45.2 the round named
    assert {("4.45.2", m) for m in ("opt", "llama", "mixtral", "qwen2", "gpt2", "falcon")} <= names, sorted(names)
    for p in PORTS:
        assert PortInfo.load(p).transformers_version == p.parent.parent.name
        assert (p.parent.parent / "aphrodite" / p.name / "PORT.json").is_file()  # both targets


def test_release_ports_convert_from_their_wheel_to_the_committed_bytes(tmp_path):
    for rel in ROOTS:
        res = _check_release(rel, tmp_path / rel.name)
        assert res.ok and res.checked, (res.errors, res.differing)


def test_release_ports_have_valid_verdicts_or_are_verified_now():
    for p in PORTS:
        if p not in _selection():
            assert verdict_status(p) == "valid", p


@pytest.mark.e2e
def test_release_ports_without_a_valid_verdict_match_their_release_at_tp1_and_tp2():
    for port_dir in _selection():  # none when every verdict is valid: nothing to re-run
        _verify(port_dir)


def _verify(port_dir):
    report = run_verify(port_dir, tps=[1, 2])
    text = render_report(report, json=False)
    assert report.exit_code == 0, text
    assert [r.tp for r in report.results] == [1, 2]
    for r in report.results:
        c = r.port.comparison
        assert c is not None and c.max_delta <= THRESHOLD and c.tokens_equal, text
    rel = port_dir.parent.parent
    assert report.verdict == f"generated/releases/{rel.name}/verdicts/vllm/{port_dir.name}.json", report.verdict
    assert verdict_status(port_dir) == "valid"


@pytest.mark.parametrize("model_type,construct", [
    # its inline MoE block adds a sigmoid-gated shared expert to the routed experts' sum: no block
    # porter maps onto FusedMoE (mixtral's, porter/analysis/moe_inline.py, has none); the port would
    # read `batch_size`, bound by a line the shape rules removed
    ("qwen2_moe", "Qwen2MoeSparseMoeBlock.forward"),
])
def test_release_files_porter_cannot_port_are_refused_with_file_and_line(tmp_path, model_type, construct):
    from porter.convert import convert
    from porter.errors import PorterError

    with pytest.raises(PorterError) as err:
        convert(model_type, ["vllm"], tmp_path, transformers="4.45.2")
    assert f"models/{model_type}/modeling_{model_type}.py:" in str(err.value) and construct in str(err.value)
    assert not any(tmp_path.iterdir())  # nothing written
