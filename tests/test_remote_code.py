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


# -- bad remote code: one line naming file:line and the construct, exit 2, nothing written ----------

GOOD = REMOTE / "qwenlike"
MODELING, CONFIG = "modeling_qwenlike.py", "configuration_qwenlike.py"


def _edit(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


def _bad_folder(tmp_path, edits: dict[str, tuple[str, str]], drop: tuple[str, ...] = ()):
    folder = tmp_path / "repo"
    folder.mkdir()
    for f in GOOD.iterdir():
        if f.is_file() and f.name not in drop:
            text = f.read_text()
            for key in (f.name, f"{f.name}#2"):  # a second edit of the same file
                if key in edits:
                    text = _edit(text, *edits[key])
            (folder / f.name).write_text(text)
    return folder


def _line_of(path, needle: str) -> int:
    return next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if needle in ln)


_TOP = "from .configuration_qwenlike import QWenLikeConfig\n"
BAD = {
    "exec": ({MODELING: ("        mixed_x_layer = self.c_attn(hidden_states)\n",
                         "        mixed_x_layer = self.c_attn(hidden_states)\n        exec('pass')\n")},
             MODELING, "exec('pass')", "exec() runs code porter cannot read statically in exec(...)"),
    "eval": ({CONFIG: ("        self.vocab_size = vocab_size\n", "        self.vocab_size = eval('vocab_size')\n")},
             CONFIG, "eval(", "eval() runs code porter cannot read statically in eval(...)"),
    "side_effect": ({MODELING: (_TOP, _TOP + "print('loading')\n")}, MODELING, "print('loading')",
                    "module-level call print(...): importing the module would do something"),
    "side_effect_loop": ({CONFIG: ("class QWenLikeConfig", "for _ in range(3):\n    pass\n\n\nclass QWenLikeConfig")},
                         CONFIG, "for _ in range(3)", "module-level for statement"),
    "missing_package": ({MODELING: (_TOP, _TOP + "import porter_no_such_package_xyz\n")}, MODELING,
                        "import porter_no_such_package_xyz",
                        "imports package 'porter_no_such_package_xyz', which is not installed"),
    # a method of the causal LM that forward reaches is read like the rest of the model
    "eval_in_forward_helper": ({MODELING: ("        lm_logits = self.lm_head(outputs.last_hidden_state)\n",
                                           "        lm_logits = self._head(outputs.last_hidden_state)\n"),
                                "modeling_qwenlike.py#2": ("    def get_output_embeddings(self):\n",
                                                           "    def _head(self, h):\n        return eval('self.lm_head')(h)\n\n"
                                                           "    def get_output_embeddings(self):\n")},
                               MODELING, "eval('self.lm_head')", "eval() runs code porter cannot read statically"),
    "missing_package_in_forward_helper": ({MODELING: ("    def get_output_embeddings(self):\n",
                                                      "    def _prep(self):\n        import porter_no_such_package_xyz\n\n"
                                                      "    def get_output_embeddings(self):\n"),
                                           "modeling_qwenlike.py#2": (
                                              "        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)\n",
                                              "        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)\n"
                                              "        self._prep()\n")},
                                          MODELING, "import porter_no_such_package_xyz",
                                          "imports package 'porter_no_such_package_xyz', which is not installed"),
    # positions computed from the cache length by a torch call: shown equal to the engine's by no rule
    "positions_from_cache_length": ({MODELING: ("        rotary_pos_emb = self.rotary_emb(kv_seq_len)\n",
                                                "        rotary_pos_emb = self.rotary_emb(kv_seq_len)\n"
                                                "        position_ids = torch.arange(past_length, kv_seq_len)\n")},
                                    MODELING, "position_ids = torch.arange(past_length, kv_seq_len)",
                                    "the positions (positions) computed by a torch call from HF-only values"),
    "missing_helper": ({MODELING: (_TOP, _TOP + "from .qwen_helpers import fast_rope\n")}, MODELING,
                       "from .qwen_helpers", "imports .qwen_helpers, which the folder does not hold"),
    "missing_config_class": ({CONFIG: ("class QWenLikeConfig(", "class OtherConfig(")}, MODELING, None,
                             "QWenLikeLMHeadModel takes config class QWenLikeConfig, which configuration_qwenlike.py "
                             "does not define"),
    "config_without_model_type": ({CONFIG: ('    model_type = "qwenlike"\n', "")}, CONFIG, "class QWenLikeConfig",
                                  "config class QWenLikeConfig declares no model_type"),
    "auto_map_class_missing": ({"config.json": ("modeling_qwenlike.QWenLikeLMHeadModel",
                                                "modeling_qwenlike.QWenLikeForCausalLM")}, MODELING, None,
                               "auto_map names causal LM QWenLikeForCausalLM, which the file does not define"),
    "auto_map_config_mismatch": ({"config.json": ("configuration_qwenlike.QWenLikeConfig",
                                                  "configuration_qwenlike.OtherConfig")}, "config.json",
                                 '"AutoConfig"', "auto_map['AutoConfig'] names OtherConfig, but QWenLikeLMHeadModel "
                                 "takes config class QWenLikeConfig"),
    "model_type_mismatch": ({"config.json": ('"model_type": "qwenlike"', '"model_type": "otherlike"')}, "config.json",
                            '"model_type"', "config.json's model_type 'otherlike' is not QWenLikeConfig's 'qwenlike'"),
    "no_causal_lm": ({MODELING: ("class QWenLikeLMHeadModel(", "class QWenLikeHead(")}, MODELING, None,
                     "no causal LM: no auto_map['AutoModelForCausalLM'] and no *ForCausalLM/*LMHeadModel class"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_remote_code_is_refused_with_file_and_line(tmp_path, case):
    import subprocess
    import sys

    edits, file, needle, message = BAD[case]
    drop = ("config.json",) if case == "no_causal_lm" else ()
    folder = _bad_folder(tmp_path, edits, drop)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "porter", "convert", str(folder), "--target", "vllm",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    where = f"{folder / file}:{_line_of(folder / file, needle)}: " if needle else f"{folder / file}: "
    assert lines[0].startswith(f"porter: error: {where}"), lines[0]
    assert message in lines[0]
    assert not out.exists()


_CHATTY = {
    MODELING: (_TOP, _TOP + "from transformers.utils import logging\n\nlogger = logging.get_logger(__name__)\n\n"
               "try:\n    from porter_no_such_kernel_xyz import fast_attention\nexcept ImportError:\n"
               "    fast_attention = None\n    logger.warning('porter_no_such_kernel_xyz is missing: the slow path runs')\n"),
    "modeling_qwenlike.py#2": ("    def get_output_embeddings(self):\n",
                               "    def process_response(self, text):\n"
                               "        return eval(text) if text.startswith('{') else text\n\n"
                               "    def chat(self, tokenizer, query, **kwargs):\n"
                               "        from porter_no_such_stream_generator_xyz import init_stream_support\n\n"
                               "        init_stream_support()\n"
                               "        out = self.generate(**tokenizer([query], return_tensors='pt'), **kwargs)\n"
                               "        return self.process_response(tokenizer.decode(out[0]))\n\n"
                               "    def get_output_embeddings(self):\n"),
}


def test_chat_helpers_module_logging_and_optional_kernels_do_not_block_a_port(tmp_path):
    """What real repositories carry beside the model (Qwen-1's `chat` importing a package the
    environment lacks, ChatGLM's `process_response` calling eval, Baichuan's module-level
    `try: import xformers except ImportError: ...; logger.warning(...)`) is no part of the port:
    not refused, not kept, and the port is byte for byte the one of the model without them."""
    from porter.convert import convert

    chatty = _bad_folder(tmp_path, _CHATTY)
    convert(str(chatty), ["vllm"], tmp_path / "chatty")
    convert(str(GOOD), ["vllm"], tmp_path / "good")
    rel = "vllm/qwenlike/porter_vllm_qwenlike/modeling_qwenlike.py"

    def body(root):
        return [ln for ln in (root / rel).read_text().splitlines() if not ln.startswith(("# Source sha256", "# Rules applied"))]

    port = (tmp_path / "chatty" / rel).read_text()
    assert "def chat" not in port and "eval(" not in port and "porter_no_such" not in port and "logger" not in port
    assert body(tmp_path / "chatty") == body(tmp_path / "good")


def test_repository_folder_resolves_statically():
    """auto_map names the causal LM (not a *ForCausalLM) and the config class; the model type is the
    config class's."""
    from porter.source import resolve

    src = resolve(str(GOOD))
    assert (src.path.name, src.model_type, src.causal_lm, src.remote) == (
        MODELING, "qwenlike", "QWenLikeLMHeadModel", True)
    assert src.config_path == GOOD / CONFIG


def test_remote_reference_runs_the_repository_code_in_a_subprocess(tmp_path):
    """verify's HF side for remote code: the folder's config class shrunk to the tiny sizes, the model
    built by transformers' remote-code loading in a subprocess (which says it executes the code),
    its greedy continuations, and logprob rows from the checkpoint it wrote that agree with them."""
    from porter.verify.remote_side import NOTICE, RemoteHF

    said = []
    hf = RemoteHF(GOOD, tmp_path / "hf", "PorterQWenLikeLMHeadModel", tiny={"num_hidden_layers": 3},
                  say=said.append)
    assert said == [f"{NOTICE}: {GOOD.resolve()} (trust_remote_code, in a subprocess: {hf.python})"]
    assert hf.spec.model_type == "qwenlike"
    assert hf.spec.config_kwargs["hidden_size"] == 128 and hf.spec.config_kwargs["num_hidden_layers"] == 3
    assert "num_key_value_heads" not in hf.spec.config_kwargs  # not a field of this config class
    assert all(len(set(r["tokens"])) >= hf.spec.min_distinct_tokens for r in hf.refs)
    seqs = [p + r["tokens"] for p, r in zip(hf.prompts, hf.refs)]
    rows = hf.logprobs(seqs)
    for p, r, row in zip(hf.prompts, hf.refs, rows):
        assert row.shape == (len(p) + len(r["tokens"]), 512)
        assert [int(row[len(p) - 1 + j].argmax()) for j in range(len(r["tokens"]))] == r["tokens"]
    ckpt = hf.checkpoint(tmp_path / "view", "PorterQWenLikeLMHeadModel")
    assert (ckpt / "model.safetensors").exists()


def test_a_class_from_another_module_of_the_folder_is_refused_where_the_model_builds_it(tmp_path):
    """MPT's repositories spread the model over modules (`from .blocks import MPTBlock`,
    `from .custom_embedding import SharedEmbedding`): porter ports the modeling file alone, so
    the first build of such a class the causal LM reaches is refused, naming its module, instead
    of a vague refusal later (the token embedding not found)."""
    import subprocess
    import sys

    build = "        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)\n"
    folder = _bad_folder(tmp_path, {MODELING: (_TOP, _TOP + "from .qwen_embedding import SharedEmbedding\n"),
                                    "modeling_qwenlike.py#2": (build, build.replace("nn.Embedding", "SharedEmbedding"))})
    (folder / "qwen_embedding.py").write_text(
        "from torch import nn\n\n\nclass SharedEmbedding(nn.Embedding):\n"
        "    def forward(self, x, unembed=False):\n"
        "        return nn.functional.linear(x, self.weight) if unembed else super().forward(x)\n")
    proc = subprocess.run([sys.executable, "-m", "porter", "convert", str(folder), "--target", "vllm",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    line = _line_of(folder / MODELING, "self.wte = SharedEmbedding(")
    assert proc.stderr.strip().splitlines() == [
        f"porter: error: {folder / MODELING}:{line}: SharedEmbedding comes from the folder's qwen_embedding.py: "
        "porter ports the modeling file alone and does not read the classes and functions it imports from the "
        "folder's other modules in QWenLikeModel: SharedEmbedding(...)"]


def test_a_norm_registered_in_hf_list_and_an_attention_table_keyed_by_a_config_field_port(tmp_path):
    """InternLM2 picks its attention class from a table keyed by its own config field
    (`INTERNLM2_ATTENTION_CLASSES[config.attn_implementation]`) and, like MiniCPM, registers its norm
    in transformers' ALL_LAYERNORM_LAYERS at import: neither changes what the model computes; the
    port is the one of the plain model."""
    from porter.convert import convert

    attn = "        self.attn = QWenAttention(config)\n"
    edits = {MODELING: ("from transformers import PreTrainedModel\n", "from transformers import PreTrainedModel\n"
                        "from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS\n")}
    edits["modeling_qwenlike.py#2"] = (
        "class QWenBlock(nn.Module):",
        'ATTENTION_CLASSES = {"eager": QWenAttention, "flash_attention_2": QWenAttention}\n\n\nclass QWenBlock(nn.Module):')
    old = _bad_folder(tmp_path, edits)
    text = (old / MODELING).read_text()
    (old / MODELING).write_text(_edit(_edit(text, attn, attn.replace(
        "QWenAttention(config)", "ATTENTION_CLASSES[config.attn_implementation](config)")),
        "class RotaryEmbedding(nn.Module):", "ALL_LAYERNORM_LAYERS.append(RMSNorm)\n\n\nclass RotaryEmbedding(nn.Module):"))
    convert(str(old), ["vllm"], tmp_path / "old")
    convert(str(GOOD), ["vllm"], tmp_path / "good")
    rel = "vllm/qwenlike/porter_vllm_qwenlike/modeling_qwenlike.py"

    def body(root):
        return [ln for ln in (root / rel).read_text().splitlines() if not ln.startswith(("# Source sha256", "# Rules applied"))]

    assert body(tmp_path / "old") == body(tmp_path / "good")


# -- trained length: Qwen-1's dynamic NTK and logn attention (PT300, PT297) --------------------------

NTK = REMOTE / "qwenntklike"


def _ntk_logits(ids, **overrides):
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(NTK, trust_remote_code=True, **overrides)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_ntk_fixture_stretches_past_its_trained_length_only():
    """The fixture's dynamic NTK and logn attention change its logits only past config.seq_length, as
    PT300 shows statically (so its port, verified within the trained length, computes no less)."""
    ids = torch.randint(0, 1024, (1, 12), generator=torch.Generator().manual_seed(3))
    plain = {"use_dynamic_ntk": False, "use_logn_attn": False}
    within = (_ntk_logits(ids, seq_length=12) - _ntk_logits(ids, seq_length=12, **plain)).abs().max().item()
    past = (_ntk_logits(ids, seq_length=8) - _ntk_logits(ids, seq_length=8, **plain)).abs().max().item()
    assert within == 0.0
    assert past > 1e-3, past


def _ntk_variant(tmp_path, old: str, new: str):
    folder = tmp_path / "repo"
    folder.mkdir()
    for f in NTK.iterdir():
        if f.is_file():
            text = f.read_text()
            (folder / f.name).write_text(_edit(text, old, new) if f.name == "modeling_qwenntklike.py" else text)
    return folder


def test_a_length_factor_that_is_not_one_within_the_trained_length_is_refused(tmp_path):
    """An NTK factor that would be 2 at every length is not the identity PT300 shows: it is still handed to
    the rotary module, whose base it raises, so the port stops there with file:line."""
    import subprocess
    import sys

    folder = _ntk_variant(tmp_path, "+ 1) - 1, 1)", "+ 1) - 1, 2)")
    proc = subprocess.run([sys.executable, "-m", "porter", "convert", str(folder), "--target", "vllm",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    line = _line_of(folder / "modeling_qwenntklike.py", "self.rotary_emb(kv_len, ntk_alpha=ntk_alpha)")
    assert proc.stderr.strip().splitlines() == [
        f"porter: error: {folder / 'modeling_qwenntklike.py'}:{line}: rotary module NtkRotaryEmbedding handed "
        "`ntk_alpha`, which its inverse frequencies are computed from (dynamic NTK scaling): the engine's get_rope "
        "computes them from the base and dims alone, and no rule shows the value is the module's default in "
        "QWenNtkAttention: self.rotary_emb(kv_len, ntk_alpha=ntk_alpha) (rule engine-rope)"]
    assert not (tmp_path / "out").exists()
