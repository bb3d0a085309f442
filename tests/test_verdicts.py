"""The verdict store (porter/verify/verdicts.py): a verdict counts only while every input of its
digest is unchanged. Editing any byte of a port's file, of the HF source it came from, or of its
tiny config changes the digest, so the port is verified again; one real engine run writes one."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from porter.layout import PortInfo
from porter.verify import THRESHOLD, run_verify
from porter.verify import verdicts as v
from porter.verify.tiny import load_rules

ROOT = Path(__file__).resolve().parents[1]
PORTS = ROOT / "generated" / "vllm"
MODEL = "llama"  # small, and its HF source has a modeling and a configuration file


@pytest.fixture
def copied(tmp_path):
    """A copy of the committed llama port under tmp/generated/vllm/llama, and of the transformers
    files it came from under tmp/transformers."""
    gen = tmp_path / "generated"
    port = gen / "vllm" / MODEL
    shutil.copytree(PORTS / MODEL, port, ignore=shutil.ignore_patterns("__pycache__"))
    info = PortInfo.load(port)
    tree = tmp_path / "transformers"
    # the files of the release the port came from (the engine's, or a newer one the weekly
    # regeneration moved the zoo to)
    root = v.release_tree(info.transformers_version)
    for f in v.source_files(info, root):
        dst = tree / f.relative_to(root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dst)
    return gen, port, tree


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def test_the_digest_covers_every_file_of_the_port(copied):
    gen, port, tree = copied
    rules = load_rules()
    base = v.digest(port, rules, tree)
    assert base is not None and base == v.digest(PORTS / MODEL, rules)  # the copy is the port
    files = sorted(p for p in port.rglob("*") if p.is_file())
    assert {p.relative_to(port).as_posix() for p in files} == set(v.inputs(port, rules, tree)["port"])
    for i, f in enumerate(files):
        original = f.read_bytes()
        for at in (0, len(original) // 2, len(original) - 1):  # first, middle and last byte
            _flip(f, at)
            assert v.digest(port, rules, tree) != base, (f, at)
            f.write_bytes(original)
        assert v.digest(port, rules, tree) == base
    # a new file in the port (a stray module) counts too; bytecode caches do not
    (port / "porter_vllm_llama" / "extra.py").write_text("")
    assert v.digest(port, rules, tree) != base
    (port / "porter_vllm_llama" / "extra.py").unlink()
    (port / "porter_vllm_llama" / "__pycache__").mkdir()
    (port / "porter_vllm_llama" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"x")
    assert v.digest(port, rules, tree) == base


def test_the_digest_covers_the_hf_source_files(copied):
    gen, port, tree = copied
    rules = load_rules()
    base = v.digest(port, rules, tree)
    sources = v.source_files(PortInfo.load(port), tree)
    names = [s.name for s in sources]
    assert "modeling_llama.py" in names and "configuration_llama.py" in names, names
    for f in sources:
        original = f.read_bytes()
        for at in (0, len(original) // 3, len(original) - 1):
            _flip(f, at)
            assert v.digest(port, rules, tree) != base, (f, at)
            f.write_bytes(original)
    assert v.digest(port, rules, tree) == base
    # the source is missing: no digest, so no verdict can count
    (tree / PortInfo.load(port).source).unlink()
    assert v.digest(port, rules, tree) is None


def test_the_digest_covers_the_tiny_config_seed_prompts_and_versions(copied, monkeypatch):
    gen, port, tree = copied
    rules = load_rules()
    base = v.digest(port, rules, tree)

    def changed(edit) -> bool:
        r = copy.deepcopy(rules)
        edit(r)
        return v.digest(port, r, tree) != base

    assert changed(lambda r: r["models"][MODEL].setdefault("config", {}).update(rope_theta=1234.0))
    assert changed(lambda r: r["models"][MODEL].setdefault("init", {}).update(seed=7))
    assert changed(lambda r: r["init"].update(seed=r["init"]["seed"] + 1))
    assert changed(lambda r: r["init"].update(std=0.3))
    assert changed(lambda r: r["defaults"].update(hidden_size=256))
    assert changed(lambda r: r["prompts"].update(seed=r["prompts"]["seed"] + 1))
    assert changed(lambda r: r["prompts"].update(lengths=[5, 17, 33, 81]))
    assert changed(lambda r: r["prompts"].update(max_new_tokens=17))
    # another model's entry, or the structural check's keys, are not what this verdict ran
    assert not changed(lambda r: r["models"]["opt"]["init"].update(seed=5))
    assert not changed(lambda r: r["models"][MODEL].update(structure={"vocab_size": 1024}))
    # the installed engine, torch and transformers
    real = v.installed_versions()
    assert set(real) == {"vllm", "torch", "transformers"} and "missing" not in real.values()
    for key in real:
        monkeypatch.setattr(v, "installed_versions", lambda k=key: {**real, k: "0.0.0"})
        assert v.digest(port, rules, tree) != base, key
    monkeypatch.undo()
    assert v.digest(port, rules, tree) == base


def test_every_committed_port_has_a_digest():
    # a day-zero port's source is read from its release's venv (make setup builds it)
    rules = load_rules()
    missing = [p.name for p in sorted(PORTS.iterdir())
               if (p / "PORT.json").is_file() and v.digest(p, rules) is None]
    assert missing == []


def test_selection_verifies_what_lacks_a_verdict_plus_a_seeded_sample():
    statuses = {f"m{i:02}": "valid" for i in range(20)}
    statuses.update(new="missing", edited="stale", broken="failed", nosrc="unknown")
    chosen, sampled = v.select(statuses, 6, seed=3)
    assert {"new", "edited", "broken", "nosrc"} <= set(chosen)
    assert len(sampled) == 6 and set(sampled) <= {m for m, s in statuses.items() if s == "valid"}
    assert len(chosen) == 10
    assert v.select(statuses, 6, seed=3) == (chosen, sampled)  # the seed replays the run
    assert any(v.select(statuses, 6, seed=s)[1] != sampled for s in range(4, 10))
    assert v.select(statuses, 6, seed=3, verify_all=True)[0] == sorted(statuses)
    assert len(v.select(statuses, 100, seed=3)[0]) == len(statuses)


@pytest.mark.e2e
def test_a_real_engine_run_writes_the_verdict_and_an_edit_invalidates_it(copied):
    gen, port, tree = copied
    inp = v.inputs(port)
    assert inp is not None
    # a port outside generated/ writes nothing to the committed store
    before = v.load(PORTS / MODEL)
    report = run_verify(port, tps=[1])
    assert report.exit_code == 0, report.reason
    assert report.verdict == "" and v.load(PORTS / MODEL) == before
    # the same run's verdict, in a store beside the copy
    path = v.record(port, report, inp, generated=gen)
    assert path == gen / "verdicts" / "vllm" / f"{MODEL}.json"
    data = json.loads(path.read_text())
    (r,) = report.results
    tp1 = data["tp"]["1"]
    assert tp1["passed"] and tp1["tokens_equal"] is True
    assert tp1["max_abs_dlogprob"] == r.port.comparison.max_delta <= THRESHOLD
    assert tp1["engine_class"] == report.expected_class == "porter_vllm_llama.modeling_llama:LlamaForCausalLM"
    assert tp1["date"].endswith("Z") and data["digest"] == v.digest_of(inp)
    assert data["cpu"]["kernels"].startswith("_C") and data["inputs"] == inp
    assert v.status(port, tps=(1,), generated=gen) == "valid"
    assert v.status(port, tps=(1, 2), generated=gen) == "failed"  # TP=2 did not run
    # one byte of the port changed: the verdict no longer counts, and says why
    modeling = "porter_vllm_llama/modeling_llama.py"
    _flip(port / modeling, 1000)
    assert v.status(port, tps=(1,), generated=gen) == "stale"
    assert v.changed(port, generated=gen) == [f"port/{modeling}"]
