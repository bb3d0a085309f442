"""Mamba-2 mixers across a refactor: transformers 5.25 moved the mixer's scan and convolution into
module functions it hands itself to (`mamba2_scan_forward(self, x, B, C, dt, cache)`, decorated
to let a hub kernel replace them; without one their own code runs). The mixer is still recognised
by what it computes: from 5.19 and from 5.25, the engine's MambaMixer2 is built with the same
arguments and parameters. Only the gated norm differs, as HF's computation does: 5.19 normalises
over the full width, 5.25 per group of `intermediate_size // n_groups` (the engine's own norm).
Real conversions: the 5.25.0 wheel is fetched with pip once and cached."""

from __future__ import annotations

import json

import pytest

from conftest import run_porter


def _ssm(tmp_path, model: str, release: str | None) -> list[dict]:
    out = tmp_path / (release or "installed")
    extra = ["--transformers", release] if release else []
    proc = run_porter("convert", model, "--target", "vllm", "--out", str(out), "--force", *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((out / "vllm" / model / "PORT.json").read_text())["plan"]["ssm"]


@pytest.mark.parametrize("model", ["mamba2", "bamba"])
def test_mamba2_mixer_reads_the_same_from_5_25(tmp_path, model):
    old, new = _ssm(tmp_path, model, None), _ssm(tmp_path, model, "5.25.0")
    assert len(old) == len(new) == 1
    keep = ("args", "params", "dt_limit", "cls", "host", "attr", "kind")
    assert {k: new[0][k] for k in keep} == {k: old[0][k] for k in keep}
    assert old[0]["norm_full_width"] is True and new[0]["norm_full_width"] is False
