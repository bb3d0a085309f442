"""Aphrodite's pipeline parallelism, stage by stage (`porter verify M --target aphrodite --pp 2`).

Aphrodite runs no forward pass on this CPU, so each stage of the port is built in a process of its
own in Aphrodite's distributed groups (gloo, pipeline size 2) and compared with the stage of
Aphrodite's own class built there: the parameters it holds, what load_weights fills and returns
from the whole checkpoint, and the loaded values. A port whose head is built on every stage (as
every Aphrodite port was before PT321 read Aphrodite's tie flag) fails on the first stage.
"""

from __future__ import annotations

import shutil

import libcst as cst
import libcst.matchers as m
import pytest

from conftest import GENERATED, run_porter
from porter.layout import PortInfo


@pytest.mark.e2e
@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_stages_hold_the_native_stages(model):
    proc = run_porter("verify", model, "--target", "aphrodite", "--pp", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "pipeline_parallel_size 2" in out and "[ok]" in out, out
    stages = [line for line in out.splitlines() if line.strip().startswith("stage ")]
    assert len(stages) == 2, out
    for line in stages:  # each holds what the native stage holds, and the same loaded values
        port, native = line.split(": ")[1].split(" parameters (native ")
        assert port == native.split(")")[0], line
        assert "equal: True" in line, line


class _HeadOnEveryStage(cst.CSTTransformer):
    """The causal LM's `if get_pp_group().is_last_rank: <head> else: <PPMissingLayer>` -> <head>."""

    def __init__(self) -> None:
        self.unwrapped = 0

    def leave_If(self, original, updated):
        last = m.If(test=m.Attribute(value=m.Call(func=m.Name("get_pp_group")), attr=m.Name("is_last_rank")),
                    orelse=m.Else(body=m.IndentedBlock(body=[m.SimpleStatementLine(body=[m.Assign(
                        targets=[m.AssignTarget(m.Attribute(value=m.Name("self"), attr=m.Name("lm_head")))])])])))
        if not m.matches(original, last):
            return updated
        self.unwrapped += 1
        return cst.FlattenSentinel(updated.body.body)


@pytest.mark.e2e
def test_head_on_every_stage_fails_on_the_first(tmp_path):
    port = tmp_path / "llama"
    shutil.copytree(GENERATED / "aphrodite" / "llama", port)
    info = PortInfo.load(port)
    modeling = port / (info.module.replace(".", "/") + ".py")
    edit = _HeadOnEveryStage()
    modeling.write_text(cst.parse_module(modeling.read_text()).visit(edit).code)
    assert edit.unwrapped == 1

    proc = run_porter("verify", str(port), "--target", "aphrodite", "--pp", "2")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stage 0: parameters differ" in proc.stdout and "only in port ['lm_head.weight']" in proc.stdout, \
        proc.stdout


def test_pp_is_refused_without_aphrodite_or_below_two():
    for args, says in ((["--pp", "2"], "--target aphrodite"), (["--target", "aphrodite", "--pp", "1"], "bad --pp 1")):
        proc = run_porter("verify", "llama", *args)
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
