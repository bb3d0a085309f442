"""porter coverage: the static list, a convert-only sweep on a few model types, and the committed
generated/COVERAGE.json checked against generated/ (no engine runs here: the committed file
comes from a real `porter coverage --verify`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import GENERATED, ROOT, run_porter
from porter import coverage as cov
from porter.errors import PorterError

CONVERTED = {"verified", "verify failed", "converted", "converted (no tiny config)"}
DIAG = re.compile(r"^models/[\w./-]+\.py:\d+: \S")


@pytest.fixture(scope="module")
def tf_root():
    root = cov.package_dir("transformers")
    assert root is not None
    return root


@pytest.fixture(scope="module")
def candidates(tf_root):
    return cov.discover(tf_root)


@pytest.fixture(scope="module")
def committed():
    data = json.loads((GENERATED / cov.COVERAGE_JSON).read_text())
    return data


def test_list_is_read_without_importing_transformers_or_vllm():
    code = (
        "import sys; from porter import coverage as c; "
        "cs = c.discover(c.package_dir('transformers')); reg = c.vllm_registry(c.package_dir('vllm')); "
        "from porter.source import transformers_tree; "
        "dz = [c.discover(transformers_tree(r), day_zero=True) for r in c.day_zero_releases()]; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'vllm', 'torch')); "
        "print(len(cs), len(reg), bad)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    n, nreg, bad = proc.stdout.split(" ", 2)
    assert int(n) > 100 and int(nreg) > 100
    assert bad.strip() == "[]"


def test_discover_classifies_from_the_files(candidates, tf_root):
    by = {c.model_type: c for c in candidates}
    # decoder-only text models stay; the others go, each for the reason its files show
    for mt in ("llama", "opt", "gpt2", "falcon", "mixtral"):
        assert by[mt].excluded is None, by[mt].excluded
    assert by["bart"].kind == "encoder-decoder"
    assert by["bert"].kind == "encoder-only"
    assert by["gemma3"].kind == "multimodal"
    # the text-only causal LM of a multimodal family builds no tower: a text decoder, a row
    g = by["gemma3_text"]
    assert g.excluded is None and g.source == "models/gemma3/modeling_gemma3.py"
    assert "text model of a multimodal family" in g.note and "builds no tower" in g.note
    assert by["gpt-sw3"].kind == "alias" and "gpt2" in by["gpt-sw3"].excluded
    for c in candidates:
        if c.excluded:
            assert c.kind, c  # every exclusion has a kind
            assert c.excluded.strip() and c.evidence, c
        else:
            # a kept model type names the file that defines its causal-LM class
            text = (tf_root / c.source).read_text()
            assert re.search(rf"^class {re.escape(c.hf_class)}\(", text, re.M), c


def test_vllm_registry_kinds():
    reg = cov.vllm_registry(cov.package_dir("vllm"))
    assert reg["LlamaForCausalLM"]["kind"] == "native" and reg["LlamaForCausalLM"]["file_exists"]
    assert reg["GPTNeoXForCausalLM"]["kind"] == "transformers-backend"
    assert reg["PersimmonForCausalLM"]["kind"] == "dropped"
    assert reg.get("PhimoeForCausalLM")["kind"] == "native"  # vLLM spells it PhiMoEForCausalLM
    assert reg.get("NoSuchForCausalLM") is None


def test_locate_gives_a_line_to_a_diagnostic_without_one():
    text = "import x\nfrom y import ACT2FN\n\nclass A(nn.Module):\n    def forward(self):\n        ACT2FN['x']\n\nclass FooLMHeadModel(A):\n    pass\n"
    assert cov.locate(text, "ACT2FN", "FooLMHeadModel") == 6  # first use, not the import
    assert cov.locate(text, "A.forward", "FooLMHeadModel") == 5
    assert cov.locate(text, "module", "FooLMHeadModel") == 8
    assert cov.locate(text, None, "FooLMHeadModel") == 8


def _committed_port(out: Path, model: str, release: str | None, targets: list[str]) -> None:
    """OUT holds MODEL's port as committed, converted from RELEASE (None: the installed one): the
    committed one when it came from that release, else a fresh conversion (a zoo the weekly
    workflow moved to a newer release has ports of that release)."""
    from porter.source import installed_transformers_version

    want = release or installed_transformers_version()
    if json.loads((GENERATED / "vllm" / model / "PORT.json").read_text())["transformers_version"] == want:
        for t in targets:
            shutil.copytree(GENERATED / t / model, out / t / model)
        return
    for t in targets:
        proc = run_porter("convert", model, "--out", str(out), "--target", t,
                          *(["--transformers", release] if release else []))
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_convert_only_sweep_on_a_few_model_types(tmp_path, committed):
    blocked = sorted(r["model_type"] for r in committed["rows"] if r["status"] == "blocked")
    only = ["opt", "llama"] + blocked[:1]
    out = tmp_path / "out"
    _committed_port(out, "opt", None, ["vllm"])
    cache = tmp_path / "cache"
    rep = cov.run_coverage(out, only=only, jobs=2, cache_dir=cache)
    rows = {r["model_type"]: r for r in rep["rows"]}
    assert rep["partial"] and set(rows) == set(only)
    assert rows["opt"]["status"] in CONVERTED and rows["llama"]["status"] in CONVERTED
    assert rows["opt"]["committed"]["matches_conversion"] is True
    assert rows["llama"]["committed"] is None
    for mt in blocked[:1]:
        assert rows[mt]["status"] == "blocked"
        assert DIAG.match(rows[mt]["diagnostic"]), rows[mt]["diagnostic"]
        assert rows[mt]["construct"]
    c = rep["counts"]
    assert c["total"] == len(only) == c["converted"] + c["blocked"] + c["crashed"]
    assert (out / cov.COVERAGE_JSON).is_file() and (out / cov.COVERAGE_MD).is_file()
    md = (out / cov.COVERAGE_MD).read_text()
    assert all(f"| {mt} |" in md for mt in only)
    # a second sweep is served from the cache (keyed by source sha256 + porter fingerprint)
    again = cov.run_coverage(out, only=only, jobs=1, cache_dir=cache, write=False)
    assert again["timings"]["converted_cached"] == len(only) and again["timings"]["converted_fresh"] == 0
    assert [r["status"] for r in again["rows"]] == [r["status"] for r in rep["rows"]]


def test_cli_coverage(tmp_path):
    proc = run_porter("coverage", "--only", "opt", "--out", str(tmp_path), "--no-cache")
    assert proc.returncode == 0, proc.stderr
    assert "1 text decoder causal LMs" in proc.stdout and "1 converted" in proc.stdout
    data = json.loads((tmp_path / cov.COVERAGE_JSON).read_text())
    assert data["rows"][0]["model_type"] == "opt"
    assert "day zero" not in proc.stdout  # opt is no day-zero model type
    dz = run_porter("coverage", "--only", "dory", "--out", str(tmp_path), "--no-cache", "--transformers", "5.24.0")
    assert dz.returncode == 0, dz.stderr
    assert "day zero, transformers 5.24.0: 1 text decoder causal LMs" in dz.stdout and "1 blocked" in dz.stdout
    none = run_porter("coverage", "--only", "dory", "--out", str(tmp_path), "--transformers", "none")
    assert none.returncode == 2 and "dory" in none.stderr  # not a model type of the installed release
    bad = run_porter("coverage", "--only", "no_such_model", "--out", str(tmp_path))
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "no_such_model" in bad.stderr


# --- the committed generated/COVERAGE.json against generated/ ----------------------------------


def test_committed_coverage_is_a_full_sweep(committed, candidates):
    assert not committed["partial"]
    listed = {r["model_type"] for r in committed["rows"]} | {e["model_type"] for e in committed["exclusions"]}
    if committed["transformers_version"] == cov.dist_version("transformers"):
        # every causal-LM entry of the installed transformers is either a row or an exclusion
        assert listed == {c.model_type for c in candidates}
        assert {r["model_type"] for r in committed["rows"]} == {c.model_type for c in candidates if not c.excluded}


def _committed_versions() -> dict[str, str]:
    """port name -> the transformers release each committed vLLM port was converted from."""
    return {p.name: json.loads((p / "PORT.json").read_text())["transformers_version"]
            for p in (GENERATED / "vllm").iterdir() if (p / "PORT.json").exists()}


def test_every_committed_port_is_listed_as_converted(committed):
    # the main sweep covers the installed transformers; a day-zero port (converted from a newer
    # release, `porter convert X --transformers 5.24.0`) is a row of that release's day-zero
    # section (test_committed_coverage_has_the_day_zero_sections). A tree the weekly workflow
    # regenerated from a newer release holds ports of that release for the main sweep's model
    # types too: each is its model type's row, naming the release it came from
    versions = _committed_versions()
    by_port = {r["port_name"]: r for r in committed["rows"]}
    ports = sorted(n for n, v in versions.items() if v == committed["transformers_version"] or n in by_port)
    assert ports
    for name in ports:
        row = by_port.get(name)
        assert row is not None, f"generated/vllm/{name} is not in COVERAGE.json: run porter coverage"
        assert row["status"] in CONVERTED and row["status"] != "verify failed", row
        assert row["committed"] and row["committed"]["path"] == f"vllm/{name}"
        assert row["committed"]["transformers_version"] == versions[name], name
        assert (GENERATED / "aphrodite" / name / "PORT.json").exists()
        if row["status"] == "verified":
            assert row["verify"]["passed"] and row["verify"]["tps"] == [1, 2]
    # the others are day-zero ports: rows of a day-zero section
    dz_ports = {r["port_name"] for sec in committed["day_zero"] for r in sec["rows"]}
    assert set(versions) - set(ports) <= dz_ports, sorted(set(versions) - set(ports) - dz_ports)
    # no row claims a committed port that is not there
    for r in committed["rows"]:
        if r["committed"]:
            assert (GENERATED / r["committed"]["path"] / "PORT.json").exists(), r["model_type"]


def test_committed_counts_add_up(committed):
    c, rows = committed["counts"], committed["rows"]
    assert c["total"] == len(rows)
    assert c["causal_lm_mapping_entries"] == c["total"] + c["excluded"] == len(rows) + len(committed["exclusions"])
    assert c["excluded"] == sum(c["excluded_by_kind"].values())
    assert c["total"] == c["converted"] + c["blocked"] + c["crashed"]
    assert c["converted"] == (c["verified"] + c["verify_failed"] + c["converted_not_verified"]
                              + c["converted_no_tiny_config"])
    assert sum(c["blocked_by_rule"].values()) == c["blocked"] + c["crashed"]
    for status, key in (("verified", "verified"), ("blocked", "blocked"), ("crashed", "crashed")):
        assert c[key] == sum(r["status"] == status for r in rows)
    assert c["converted"] == sum(r["status"] in CONVERTED for r in rows)
    assert c["committed_ports"] == sum(bool(r["committed"]) for r in rows)


def test_committed_blocked_rows_name_a_construct_at_file_line(committed):
    for r in committed["rows"]:
        if r["status"] in ("blocked", "crashed"):
            assert r["construct"], r
            assert "error" != r["diagnostic"].strip().lower()
        if r["status"] == "blocked":
            assert DIAG.match(r["diagnostic"]), r["diagnostic"]
            assert r["file"] and isinstance(r["line"], int) and r["line"] > 0
        else:
            assert r["status"] != "crashed" or r["diagnostic"].startswith("porter crashed")


def test_committed_exclusions_have_reasons(committed):
    assert committed["exclusions"]
    for e in committed["exclusions"]:
        assert e["kind"] in ("encoder-decoder", "encoder-only", "multimodal", "not-causal-lm", "alias"), e
        assert e["reason"] and e["evidence"], e
    md = (GENERATED / cov.COVERAGE_MD).read_text()
    for e in committed["exclusions"]:
        assert f"| {e['model_type']} | {e['hf_class']} | {e['kind']} |" in md
    for r in committed["rows"]:
        assert f"| {r['model_type']} | {r['hf_class']} | {r['status']} |" in md


# --- day zero: the model types only a newer release has (issue 11) -----------------------------


@pytest.fixture(scope="module")
def release_tree():
    from porter.source import transformers_tree

    (release,) = cov.day_zero_releases()[:1] or pytest.skip("no day_zero_releases in rules/coverage.yaml")
    return release, transformers_tree(release)


@pytest.fixture(scope="module")
def dz_candidates(release_tree, candidates):
    installed = {c.model_type for c in candidates}
    return {c.model_type: c for c in cov.discover(release_tree[1], day_zero=True) if c.model_type not in installed}


def test_day_zero_releases_are_data(tmp_path, monkeypatch):
    assert cov.day_zero_releases() == ["5.24.0", "5.25.0"]  # rules/coverage.yaml
    monkeypatch.setenv("PORTER_RULES_DIR", str(tmp_path))
    assert cov.day_zero_releases() == []  # no table: no day-zero section
    (tmp_path / cov.COVERAGE_RULES).write_text("day_zero_releases: 5.24.0\n")
    with pytest.raises(PorterError, match="list of version strings"):
        cov.day_zero_releases()


def test_day_zero_list_is_the_main_sweeps_logic_on_the_release(release_tree, dz_candidates):
    release, tree = release_tree
    assert tree.parent.name == release and not (tree / "__init__.py").exists()  # models/** of the wheel only
    plain = {c.model_type: c for c in cov.discover(tree)}
    assert dz_candidates and set(dz_candidates) <= set(plain)
    for mt, c in dz_candidates.items():
        p = plain[mt]
        if c.note is None and c.kind == "alias" and p.kind != "alias":
            # a second entry of a class kept by a day-zero note (dots3_note_text -> dots3_note)
            owner = c.excluded.split("model type ")[1].split(" ")[0]
            assert dz_candidates[owner].note and dz_candidates[owner].hf_class == c.hf_class, mt
        elif c.note is None:  # the same verdict and reason as the main sweep's
            assert (c.excluded, c.kind, c.source) == (p.excluded, p.kind, p.source), mt
        elif c.note == p.note:  # the text model of a multimodal family: kept by both sweeps
            assert c.excluded is None and p.excluded is None and c.source == p.source, mt
            assert "text model of a multimodal family" in c.note and (tree / c.source).is_file()
        else:  # kept only for a reason that holds for a release newer than the engine's
            assert c.excluded is None and c.config_only and p.kind == "alias", (mt, p.excluded)
            assert c.source and (tree / c.source).is_file()
    # new dense / MoE models are rows; the known exclusions keep their reasons
    for mt in ("dory", "beam", "flint", "kolibri1", "lfm3"):
        assert dz_candidates[mt].excluded is None and dz_candidates[mt].note is None
    assert dz_candidates["moss_transcribe_diarize"].kind == "encoder-decoder"
    # config only: transformers builds LlamaForCausalLM from exaone's own config
    ex = dz_candidates["exaone"]
    assert ex.config_only and ex.source == "models/llama/modeling_llama.py" and "config only" in ex.note
    # the text model of a multimodal family; a second entry of the same class is an alias
    ap = dz_candidates["apertus1p5_text"]
    assert ap.excluded is None and ap.source == "models/apertus1p5/modeling_apertus1p5.py"
    assert plain["apertus1p5_text"].excluded is None  # the same rule in the main sweep
    assert dz_candidates["dots3_note"].excluded is None
    assert dz_candidates["dots3_note_text"].kind == "alias"


def test_day_zero_sweep_on_a_few_model_types(tmp_path, release_tree):
    release, _ = release_tree
    out = tmp_path / "out"
    _committed_port(out, "exaone", release, ["vllm", "aphrodite"])  # a committed day-zero port
    cache = tmp_path / "cache"
    # the test harness's record of a verified committed port (record_verification's key)
    from porter.layout import PortInfo
    from porter.verify.tiny import load_rules

    rules = load_rules()
    info = PortInfo.load(out / "vllm" / "exaone")
    key = cov.verify_key(cov.files_digest(info.files), rules["models"]["exaone"], rules)
    cov.Cache(cache).put("verify", key, {"status": "passed", "passed": True, "exit_code": 0, "tps": [1, 2],
                                         "port": "committed", "max_abs_dlogprob": 4.5e-05, "key": key})
    only = ["exaone", "dory", "apertus1p5_text"]
    rep = cov.run_coverage(out, only=only, jobs=1, cache_dir=cache, day_zero=[release])
    assert rep["rows"] == [] and rep["day_zero_releases"] == [release]
    (sec,) = rep["day_zero"]
    assert sec["release"] == release
    rows = {r["model_type"]: r for r in sec["rows"]}
    assert set(rows) == set(only)
    # the sweep's conversion is byte for byte `porter convert exaone --transformers 5.24.0`
    assert rows["exaone"]["committed"]["matches_conversion"] is True
    assert rows["exaone"]["status"] == "verified" and rows["exaone"]["verify"]["carried_over"]
    assert rows["apertus1p5_text"]["port_name"] == "apertus1p5"
    assert rows["apertus1p5_text"]["status"] in CONVERTED and rows["apertus1p5_text"]["note"]
    d = rows["dory"]
    assert d["status"] == "blocked" and DIAG.match(d["diagnostic"]) and d["construct"] and d["line"]
    c = sec["counts"]
    assert c["total"] == 3 == c["converted"] + c["blocked"] + c["crashed"] and c["verified"] == 1
    assert c["kept_by_day_zero_note"] == 2
    md = (out / cov.COVERAGE_MD).read_text()
    assert f"## Day zero: transformers {release}" in md
    assert all(f"| {mt} | {rows[mt]['hf_class']} | {rows[mt]['status']} |" in md for mt in only)
    # cached the second time; no day-zero section when asked for none
    again = cov.run_coverage(out, only=only, jobs=1, cache_dir=cache, day_zero=[release], write=False)
    assert again["day_zero"][0]["timings"]["converted_fresh"] == 0
    none = cov.run_coverage(out, only=["opt"], jobs=1, cache_dir=cache, day_zero=[], write=False)
    assert none["day_zero"] == [] and none["day_zero_releases"] == []


def test_committed_coverage_has_the_day_zero_sections(committed, dz_candidates, release_tree):
    release, _ = release_tree
    assert committed["day_zero_releases"] == cov.day_zero_releases()
    secs = {s["release"]: s for s in committed["day_zero"]}
    assert set(secs) == set(committed["day_zero_releases"])
    sec = secs[release]
    c, rows = sec["counts"], sec["rows"]
    # every new causal-LM entry of the release is a row or an exclusion, as the main sweep's
    assert {r["model_type"] for r in rows} == {m for m, x in dz_candidates.items() if not x.excluded}
    assert {e["model_type"] for e in sec["exclusions"]} == {m for m, x in dz_candidates.items() if x.excluded}
    assert c["new_causal_lm_mapping_entries"] == len(rows) + len(sec["exclusions"])
    assert c["total"] == len(rows) == c["converted"] + c["blocked"] + c["crashed"]
    assert c["converted"] == (c["verified"] + c["verify_failed"] + c["converted_not_verified"]
                              + c["converted_no_tiny_config"])
    assert c["verified"] == sum(r["status"] == "verified" for r in rows)
    for r in rows:
        assert r["release"] == release
        if r["status"] == "blocked":
            assert r["construct"] and DIAG.match(r["diagnostic"]), r["diagnostic"]
            assert isinstance(r["line"], int) and r["line"] > 0
    # every committed day-zero port (a model type the installed transformers lacks) is a row of
    # its release's section, converted as committed and verified at TP=1,2 (the weekly workflow's
    # tree moves the ports of the older day-zero releases to the newest one)
    main = {r["port_name"] for r in committed["rows"]}
    day_zero_ports = {n: v for n, v in _committed_versions().items() if n not in main}
    assert day_zero_ports
    for name, version in sorted(day_zero_ports.items()):
        assert version in secs, f"generated/vllm/{name}: transformers {version} is not a day-zero release"
        row = {r["port_name"]: r for r in secs[version]["rows"]}.get(name)
        assert row is not None, f"generated/vllm/{name} is not in COVERAGE.json's day zero: run porter coverage"
        assert row["committed"]["path"] == f"vllm/{name}" and row["committed"]["matches_conversion"], name
        assert row["status"] == "verified" and row["verify"]["tps"] == [1, 2], row
    md = (GENERATED / cov.COVERAGE_MD).read_text()
    assert f"## Day zero: transformers {release}" in md
    for r in rows:
        assert f"| {r['model_type']} | {r['hf_class']} | {r['status']} |" in md


def test_a_model_type_resolves_through_transformers_module_names():
    # gemma3_text is a row of the sweep; `porter convert gemma3_text` finds its class in models/gemma3/
    from porter.source import resolve

    src = resolve("gemma3_text")
    assert src.rel_path == "models/gemma3/modeling_gemma3.py" and src.model_type == "gemma3"
    with pytest.raises(PorterError, match="unknown model_type 'nosuch'"):
        resolve("nosuch")


def test_a_row_verified_from_the_verdict_store_names_a_holding_verdict(committed):
    # COVERAGE reads the verdict store: a committed port whose verdict (generated/verdicts/) holds
    # for its files, sources, tiny config and versions is a verified row with that verdict's numbers
    # (read in this direction: the suite's own engine runs may add verdicts while it runs)
    from porter.verify import verdicts

    rows = list(committed["rows"])
    for sec in committed.get("day_zero") or []:
        rows += sec["rows"]
    from_store = [r for r in rows if (r.get("verify") or {}).get("verdict")]
    assert from_store
    for r in from_store:
        v = r["verify"]
        assert r["status"] == "verified" and v["passed"] and v["tps"] == [1, 2], r["model_type"]
        assert v["max_abs_dlogprob"] <= 1e-4, r["model_type"]
        assert (GENERATED.parent / v["verdict"]).is_file(), v["verdict"]
        assert verdicts.status(GENERATED / r["committed"]["path"]) == "valid", r["model_type"]
