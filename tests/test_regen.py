"""porter regen: the committed ports are current (--check), an edited port is named, a newer
transformers release converts and its drift is reported, and the regenerate workflow lints clean.
Real runs: the wheel of the newer release is fetched with pip once and cached."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import GENERATED, MODELS, ROOT, TARGETS, run_porter

NEW_RELEASE = "5.24.0"
WORKFLOW = ROOT / ".github" / "workflows" / "regenerate.yml"


def test_check_passes_on_the_committed_ports(tmp_path):
    # every committed port is current: the transformers ports (generated/<target>/<model_type>) are
    # each converted again and compared file by file by tests/test_diff.py (porter diff refuses a
    # committed port any file of which differs); here `regen --check` runs on the rest of the tree
    # (the remote-code ports, reconverted from the fixture folder each records, and the ports of
    # older releases, generated/releases/<version>/) beside two of those
    root = tmp_path / "generated"
    keep = shutil.ignore_patterns("__pycache__", "*.pyc")
    for sub in ("remote", "releases"):
        shutil.copytree(GENERATED / sub, root / sub, ignore=keep)
    for target in TARGETS:
        for model in ("llama", "falcon"):
            shutil.copytree(GENERATED / target / model, root / target / model, ignore=keep)
    proc = run_porter("regen", "--check", "--root", str(root))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    remote = list((GENERATED / "remote").glob("*/*/PORT.json"))
    releases = list((GENERATED / "releases").glob("*/*/*/PORT.json"))
    assert remote and releases
    assert f"{2 * len(TARGETS) + len(remote) + len(releases)} port(s)" in proc.stdout


def test_check_names_the_file_that_differs(tmp_path):
    # (a few committed ports, each target: the check of the whole tree is the test above)
    root = tmp_path / "generated"
    for target in TARGETS:
        for model in ("llama", "opt", "gpt2"):
            shutil.copytree(GENERATED / target / model, root / target / model,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    edited = root / "vllm" / "llama" / "porter_vllm_llama" / "modeling_llama.py"
    edited.write_text(edited.read_text().replace("QKVParallelLinear(", "QKVParallelLinear( ", 1))
    proc = run_porter("regen", "--check", "--root", str(root))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("differs: ")]
    assert lines == [f"differs: {edited}"], proc.stdout
    # the other ports were checked and are the same: only the edited file is named
    assert "aphrodite" not in proc.stdout


@pytest.fixture(scope="module")
def regen_new_release(tmp_path_factory):
    out = tmp_path_factory.mktemp("regen") / "generated"
    # (and the release matrix: every committed model from 8 releases, ~600 conversions)
    proc = run_porter("regen", "--transformers", NEW_RELEASE, "--out", str(out), timeout=1800)
    return proc, out


def test_regen_newer_release_converts_every_committed_model(regen_new_release):
    proc, out = regen_new_release
    assert proc.returncode == 0, proc.stdout + proc.stderr
    drift = json.loads((out / "DRIFT.json").read_text())
    assert drift["failed"] == []
    # a port of a release newer than this one (a later day-zero port) is skipped, not downgraded
    newer = {m: v for m in MODELS
             if _release(v := json.loads((GENERATED / "vllm" / m / "PORT.json").read_text())[
                 "transformers_version"]) > _release(NEW_RELEASE)}
    assert newer, "no committed port of a release newer than the one regenerated here"
    assert drift["skipped"] == [{"model_type": m, "transformers": v} for m, v in sorted(newer.items())]
    assert sorted(m["model_type"] for m in drift["models"]) == sorted(set(MODELS) - set(newer))
    md = (out / "DRIFT.md").read_text()
    assert all(f"{m} ({v})" in md for m, v in newer.items())
    for model in sorted(set(MODELS) - set(newer)):
        for target in TARGETS:
            info = json.loads((out / target / model / "PORT.json").read_text())
            assert info["transformers_version"] == NEW_RELEASE
            port = out / target / model / f"porter_{target}_{model}" / f"modeling_{model}.py"
            text = port.read_text()
            assert f"transformers {NEW_RELEASE}" in text
            # 5.24 renamed past_key_values to cache: stripped like its old name
            assert "cache:" not in text and "past_key_values" not in text
    # committed ports untouched
    assert json.loads((GENERATED / "vllm" / "llama" / "PORT.json").read_text())[
        "transformers_version"] != NEW_RELEASE


def _takes_a_cache(source: str) -> bool:
    """Whether the installed release's modeling file (``models/x/modeling_x.py``) names a cache."""
    import transformers
    text = (Path(transformers.__file__).parent / source).read_text()
    return "past_key_values" in text or "cache_params" in text


def test_drift_report_names_what_changed(regen_new_release):
    _, out = regen_new_release
    drift = json.loads((out / "DRIFT.json").read_text())
    md = (out / "DRIFT.md").read_text()
    for m in drift["models"]:
        committed = json.loads((GENERATED / "vllm" / m["model_type"] / "PORT.json").read_text())
        assert m["transformers"] == {"before": committed["transformers_version"], "after": NEW_RELEASE}
        assert m["source_sha256"]["before"] == committed["source_sha256"]
        if committed["transformers_version"] == NEW_RELEASE:  # a day-zero port: already from it
            assert m["source_changed"] is False and m["signatures_changed"] == {}
            assert all(t["files_changed"] == [] for t in m["targets"].values()), m["targets"]
            continue
        assert m["source_sha256"]["after"] != committed["source_sha256"]
        assert m["source_sha256"]["after"] in md
        # the rename, found in the HF source's signatures
        # (in any forward: trocr's base model is a `TrOCRDecoder`; a state-space model's cache
        # argument was cache_params; openai-gpt's forward never took a cache, so it has no rename)
        forwards = [v for k, v in m["signatures_changed"].items() if k.endswith(".forward")]
        renamed = any({"past_key_values", "cache_params"} & set(f["removed"]) and "cache" in f["added"]
                      for f in forwards)
        assert renamed == _takes_a_cache(m["source"]), m
        for target in TARGETS:
            t = m["targets"][target]
            assert t["status"] == "converted" and t["verify"] == "not run"
            module = f"porter_{target}_{m['model_type']}/modeling_{m['model_type']}.py"
            assert module in t["files_changed"]
            # the rename reaches the port's code where a kept signature changed with it (its header
            # names the release in every port; modernbert_decoder's code is the same in both)
            body = [(root / target / m["model_type"] / module).read_text().splitlines()[5:]
                    for root in (GENERATED, out)]
            if body[0] != body[1]:
                assert any(r.startswith("PT010 ") for r in t["rules_output_changed"])
        assert f"## {m['model_type']}" in md
    # ports of a release before 5.24 meet its cache rename (a tree the weekly workflow moved to a
    # newer release already has it: NEW_RELEASE then regenerates none of its ports, all skipped)
    if any(_release(m["transformers"]["before"]) < _release("5.24.0") for m in drift["models"]):
        assert "-past_key_values +cache" in md
        assert "rules whose output changed" in md


DAY_ZERO = "5.25.0"


# cells of the release matrix porter refuses, with the reason it gives ((model, release) -> reason).
# None today: cohere_compass of 5.17 and 5.18, whose rotary takes its three M-RoPE axes of positions
# from the model (5.19's copies one axis to three itself), converts since porter runs the model's
# forward up to the rotary call and sees the positions on every axis (tests/test_position_axes.py)
KNOWN_GAPS: dict[tuple[str, str], str] = {}


def _installed() -> str:
    from porter.source import installed_transformers_version

    return installed_transformers_version()


ENGINE = _installed()


def _release(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def test_release_matrix_in_drift_md_converts_every_model_from_every_release(regen_new_release):
    """The release matrix `porter regen` writes into DRIFT.md: every committed model type converted
    from every release of rules/coverage.yaml (5.16.0 ... 5.25.0); a day-zero model type is absent
    only from the releases before its own. The matrix converts the vllm target in two processes,
    each (model, files read) once, cached under .porter-cache/coverage/matrix/. No cell fails but
    the refusals named in KNOWN_GAPS; an older release converts a model type or lacks it;
    bamba and mamba2 convert from 5.25.0 too (5.25 moved the mamba2 mixer's scan into a module
    function decorated for hub kernels; porter reads the function's own code: test_ssm_releases.py)."""
    _, out = regen_new_release
    drift = json.loads((out / "DRIFT.json").read_text())
    mx = drift["matrix"]
    assert mx["releases"][0] == "5.16.0" and mx["releases"][-1] == DAY_ZERO
    assert {"5.16.1", "5.17.0", "5.18.0", "5.19.0", "5.24.0"} <= set(mx["releases"])
    assert sorted(mx["rows"]) == sorted(MODELS)
    from porter.source import transformers_root

    for model, cells in mx["rows"].items():
        info = json.loads((GENERATED / "vllm" / model / "PORT.json").read_text())
        recorded = info["transformers_version"]
        for release, cell in cells.items():
            if (model, release) in KNOWN_GAPS:
                assert cell["status"] == "failed" and KNOWN_GAPS[model, release] in cell["error"], cell
            elif _release(release) >= _release(recorded):
                assert cell["status"] == "converted", (model, release, cell)
            elif (info.get("config_class") or not (transformers_root() / info["source"]).is_file()) \
                    and _release(release) <= _release(ENGINE):
                # a day-zero model type (the engine's transformers lacks its modeling file or its
                # config, which the port then ships): absent from the releases up to the engine's
                # (the zoo may have moved to a newer release since: the weekly workflow regenerates
                # every port from the newest)
                assert cell["status"] == "absent", (model, release, cell)
            else:  # an older release converts the model type, or does not have it yet
                assert cell["status"] in ("converted", "absent"), (model, release, cell)
    assert sorted(tuple(f) for f in mx["failed"]) == sorted(KNOWN_GAPS)
    md = (out / "DRIFT.md").read_text()
    assert "## Release matrix" in md and "| falcon | " + " | ".join(["✓"] * len(mx["releases"])) + " |" in md


def test_falcon_from_5_25_has_the_plan_of_5_19(tmp_path):
    """5.25 rewrote falcon's q/k/v split inline and moved its ALiBi bias into the mask: the port's
    plan (grouped q/k/v, heads, ALiBi slopes and their scale, rotary) is 5.19's."""
    proc = run_porter("convert", "falcon", "--transformers", DAY_ZERO, "--target", "vllm", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((tmp_path / "vllm" / "falcon" / "PORT.json").read_text())["plan"]["attentions"][0]
    committed = json.loads((GENERATED / "vllm" / "falcon" / "PORT.json").read_text())["plan"]["attentions"][0]
    for key in ("grouped", "packed", "interleaved", "num_heads", "num_kv_heads", "alibi", "alibi_when",
                "alibi_scale", "rope", "q", "o"):
        assert plan[key] == committed[key], key


def test_regen_unknown_release_is_one_line_error(tmp_path):
    proc = run_porter("regen", "--transformers", "0.0.0.999", "--out", str(tmp_path))
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("porter: error: cannot fetch transformers 0.0.0.999")


def test_regenerate_workflow_passes_actionlint():
    exe = Path(sys.executable).parent / "actionlint"
    exe = str(exe) if exe.exists() else shutil.which("actionlint")
    assert exe, "actionlint is not installed (pip install -e '.[test]')"
    proc = subprocess.run([exe, str(WORKFLOW)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("model", ["gemma3", "cohere_compass", "dbrx"])
def test_a_zoo_type_converted_from_5_25_verifies_against_5_25(model, tmp_path):
    """The weekly regeneration against 5.25 moves the zoo to that release's files. gemma3's
    Gemma3ForCausalLM takes gemma3_text's config in 5.25 too: the reference in the 5.25 venv looks
    the config class up in that release's auto table (the composite Gemma3Config has no
    hidden_size). 5.25's Cohere Compass hands its layers `position_ids=position_ids[0]`, None for
    the engine's flat positions, into `**kwargs` HF never reads: the port threads the engine's
    positions instead (it used to pass None and failed in the engine). 5.25 writes bookkeeping
    keys (`_name_or_path`, `output_attentions`) into dbrx's nested sub-configs, which the engine's
    5.19 DbrxFFNConfig rejects: the reference checkpoint leaves them out."""
    out = tmp_path / "out"
    proc = run_porter("convert", model, "--transformers", "5.25.0", "--out", str(out), "--target", "vllm")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_porter("verify", str(out / "vllm" / model), "--tp", "1", timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "HF reference: transformers 5.25.0" in proc.stdout
    worst = float(re.search(r"PASS \(exit 0\): max \|Δ\| (\S+) <= 0\.0001", proc.stdout).group(1))
    assert worst <= 1e-4
