"""A config property of a newer transformers release that the engine's config class lacks (issue 29:
5.25's kv_sharing_modes of the Gemma 4 configs) becomes a function of the config in the port, which
computes what the release's property computes, for configs the release itself builds."""

from __future__ import annotations

import ast
import json
import subprocess

from porter.analysis.config_properties import missing_properties
from porter.source import transformers_root, transformers_tree

RELEASE = "5.25.0"
REL = "models/gemma4_unified/modeling_gemma4_unified.py"
CONFIG = "models/gemma4_unified/configuration_gemma4_unified.py"

# (num_hidden_layers, num_kv_shared_layers, sliding_window_pattern as layer types)
CASES = [(4, 0, 2), (6, 2, 3), (8, 4, 2), (6, 1, 2), (3, 3, 3)]


def test_the_engines_own_config_has_no_missing_property():
    root = transformers_root()
    assert missing_properties(root / CONFIG, REL, root) == {}


def test_kv_sharing_modes_of_525_is_missing_from_the_engines_config():
    found = missing_properties(transformers_tree(RELEASE) / CONFIG, REL, transformers_root())
    prop = found["kv_sharing_modes"]
    assert prop.cls == "Gemma4UnifiedTextConfig"
    assert set(prop.reads) == {"layer_types", "num_hidden_layers", "num_kv_shared_layers"}
    assert prop.calls == ()


def test_the_port_computes_what_the_release_computes(tmp_path):
    from porter.convert import convert
    from porter.verify.hfenv import ensure_env

    (conv,) = convert("gemma4_unified", ["vllm"], tmp_path / "ports", transformers=RELEASE)
    assert any(r.startswith("PT340") for r in conv.rules_applied), conv.rules_applied
    text = next(v for k, v in conv.files.items() if k.endswith("modeling_gemma4_unified.py"))
    assert "config.kv_sharing_modes" not in text  # no read of the engine config's missing attribute
    fn = next(n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name == "config_kv_sharing_modes")
    space: dict = {}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "port", "exec"), space)  # porter's own output

    # the release's own property, run in that release's environment
    script = (
        "import json, sys\nfrom transformers.models.gemma4_unified.configuration_gemma4_unified import "
        "Gemma4UnifiedTextConfig as C\nout = []\n"
        "for n, shared, period in json.loads(sys.argv[1]):\n"
        "    types = ['full_attention' if (i + 1) % period == 0 else 'sliding_attention' for i in range(n)]\n"
        "    types[-1] = 'full_attention'\n"
        "    c = C(num_hidden_layers=n, num_kv_shared_layers=shared, layer_types=types)\n"
        "    out.append({'fields': {'num_hidden_layers': c.num_hidden_layers, 'num_kv_shared_layers': "
        "c.num_kv_shared_layers, 'layer_types': c.layer_types}, 'modes': c.kv_sharing_modes})\n"
        "print(json.dumps(out))\n"
    )
    python = ensure_env(RELEASE)
    proc = subprocess.run([str(python), "-c", script, json.dumps(CASES)], capture_output=True, text=True, check=True)
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(CASES)

    class Fields:
        def __init__(self, d):
            self.__dict__.update(d)

    for r in results:
        assert space["config_kv_sharing_modes"](Fields(r["fields"])) == r["modes"], r
    assert any("store" in r["modes"] and "reuse" in r["modes"] for r in results)
