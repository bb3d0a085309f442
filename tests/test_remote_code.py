"""Issue 23: remote-code models (modeling files that live in model repositories).

The fixtures under tests/fixtures/remote/ were written for these tests in the styles of such
repositories; each must first be a correct Hugging Face model: loaded the way transformers loads
remote code (trust_remote_code), its incremental decode with its own cache equals a full forward.
"""

from __future__ import annotations

import pytest
import torch

from conftest import ROOT

REMOTE = ROOT / "tests" / "fixtures" / "remote"
STYLES = sorted(p.name for p in REMOTE.iterdir() if (p / "config.json").is_file())


@pytest.mark.parametrize("name", STYLES)
def test_fixture_is_a_correct_hf_model(name):
    import transformers

    folder = REMOTE / name
    cfg = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, trust_remote_code=True, dtype=torch.float32)
    model.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        out = model(input_ids=ids[:, :7], use_cache=True)
        steps, past = [out.logits], out.past_key_values
        for i in range(7, ids.shape[1]):
            out = model(input_ids=ids[:, i : i + 1], past_key_values=past, use_cache=True)
            steps.append(out.logits)
            past = out.past_key_values
    incremental = torch.cat(steps, dim=1)
    assert full.shape == (2, 12, cfg.vocab_size)
    assert (full - incremental).abs().max().item() < 1e-5
