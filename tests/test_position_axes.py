"""M-RoPE positions handed to a rotary by the model (porter/analysis/position_axes.py).

transformers 5.17/5.18's CohereCompass rotary takes three axes of positions from the model
instead of copying one row itself (5.19: `position_ids.expand(3, -1, -1)`); porter runs the model's
forward up to the rotary call on index arrays and sees, for text-only inputs, the positions on
every axis: both releases convert to 5.19's (verified) port (converted here from the installed
release, not read from generated/, which the weekly regeneration rewrites from a newer one). Real conversions from the release
wheels (fetched with pip once and cached); the unit cases are small sources written here."""

from __future__ import annotations

import json

import libcst as cst
import pytest

from conftest import run_porter
from porter.analysis.index import build_index
from porter.analysis.position_axes import hands_copied_axes

_VOLATILE = ("source_sha256", "transformers_version", "files")


def _without_lines(node):
    if isinstance(node, dict):
        return {k: _without_lines(v) for k, v in node.items() if k != "line"}
    if isinstance(node, list):
        return [_without_lines(v) for v in node]
    return node


@pytest.fixture(scope="module")
def installed_port(tmp_path_factory):
    """cohere_compass converted from the installed transformers (5.19)."""
    out = tmp_path_factory.mktemp("cohere-compass-installed")
    proc = run_porter("convert", "cohere_compass", "--target", "all", "--out", str(out), "--force")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("release", ["5.17.0", "5.18.0"])
def test_cohere_compass_from_older_release_is_the_installed_release_port(tmp_path, release, installed_port):
    proc = run_porter("convert", "cohere_compass", "--transformers", release, "--target", "all",
                      "--out", str(tmp_path), "--force")
    assert proc.returncode == 0, proc.stderr
    for target in ("vllm", "aphrodite"):
        new, old = tmp_path / target / "cohere_compass", installed_port / target / "cohere_compass"
        code = f"porter_{target}_cohere_compass/modeling_cohere_compass.py"
        # the same code but for the two header lines naming the source release and its digest
        new_lines, old_lines = ((d / code).read_text().splitlines() for d in (new, old))
        assert new_lines[0] == old_lines[0] and new_lines[4:] == old_lines[4:]
        assert f"transformers {release}" in new_lines[2]
        plan_new, plan_old = (json.loads((d / "PORT.json").read_text()) for d in (new, old))
        assert plan_new["transformers_version"] == release
        assert _without_lines({k: v for k, v in plan_new.items() if k not in _VOLATILE}) == \
            _without_lines({k: v for k, v in plan_old.items() if k not in _VOLATILE})


_ROTARY = '''
class Rotary(nn.Module):
    def forward(self, x, position_ids, layer_type=None):
        freqs = position_ids[:, :, None, :].float()
        return freqs.cos().to(dtype=x.dtype), freqs.sin().to(dtype=x.dtype)


class Model(nn.Module):
    def __init__(self, config):
        self.rotary_emb = Rotary(config)

    def forward(self, input_ids=None, position_ids=None, past_key_values=None, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
%s
        cos_sin = {t: self.rotary_emb(inputs_embeds, position_ids, t) for t in ("a", "b")}
        return cos_sin
'''

COPIED = {  # what the model does with the positions before the call: copies on every axis
    "view-expand-slice": "            position_ids = position_ids.view(1, 1, -1).expand(4, inputs_embeds.shape[0], -1)\n"
                         "        elif position_ids.ndim == 2:\n"
                         "            position_ids = position_ids[None, ...].expand(4, position_ids.shape[0], -1)\n"
                         "        if position_ids.ndim == 3 and position_ids.shape[0] == 4:\n"
                         "            position_ids = position_ids[1:]",
    "unsqueeze-expand": "            position_ids = position_ids[None, :].expand(inputs_embeds.shape[0], -1)\n"
                        "        position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)",
}
NOT_COPIED = {  # must stay refused: axes that differ, or one row the rotary never copies
    "axes-differ": "            position_ids = position_ids.view(1, 1, -1).expand(3, inputs_embeds.shape[0], -1)\n"
                   "        position_ids = torch.arange(3 * inputs_embeds.shape[1]).view(3, 1, -1)"
                   ".expand(3, inputs_embeds.shape[0], -1)",
    "one-row": "            position_ids = position_ids[None, :].expand(inputs_embeds.shape[0], -1)",
    "positions-shifted": "            position_ids = position_ids.view(1, 1, -1).expand(3, inputs_embeds.shape[0], -1)\n"
                          "        elif position_ids.ndim == 2:\n"
                          "            position_ids = position_ids[None, ...].expand(3, position_ids.shape[0], -1)\n"
                          "        position_ids = position_ids[:1] + 1",
}


def _index(body: str):
    src = "import torch\nfrom torch import nn\n" + _ROTARY % body
    return build_index(cst.parse_module(src), "<example>", src)


@pytest.mark.parametrize("case", sorted(COPIED))
def test_positions_copied_to_every_axis_are_shown(case):
    idx = _index(COPIED[case])
    assert hands_copied_axes(idx, idx.classes["Rotary"])


@pytest.mark.parametrize("case", sorted(NOT_COPIED))
def test_positions_not_copied_stay_unshown(case):
    idx = _index(NOT_COPIED[case])
    assert not hands_copied_axes(idx, idx.classes["Rotary"])
