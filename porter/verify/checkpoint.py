"""`porter verify PORT --checkpoint DIR`: the port on a real HF checkpoint, with real text.

DIR is a checkpoint folder as HF saves one (config.json, *.safetensors, tokenizer files). Before
anything runs, ``preflight`` checks it and refuses a bad one in one line naming the file or the
tensor (exit 2): no config.json, an architecture the port does not serve, no tokenizer, no or a
truncated safetensors file, a missing tensor, a tensor of the wrong shape.

``RealHF`` is then the HF side of the verify (the same questions ``porter.verify.hfref.LocalHF``
answers for a tiny model): the prompts are text through DIR's tokenizer and its chat template
when it has one; the reference is DIR's model in eager fp32; greedy continuations of 32 tokens.
The engine gets a view of DIR whose config.json names the port's class (every other file is a
symlink to DIR's), so the engine builds the port, not its native class, from the real weights.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from porter.layout import PortInfo
from porter.verify.tiny import VerifyInputError, experts_routed, hf_logprobs, with_architecture

MAX_NEW_TOKENS = 32
TOP_LOGPROBS = 20
# real questions; the answers run past 32 tokens, so every greedy step is text, not what the
# model says after its end-of-turn token
DEFAULT_PROMPTS = (
    "What is the capital of France? Answer in two sentences and say why it is famous.",
    "Write a short poem about the sea.",
    "Explain in a few sentences how a bicycle works.",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model",
                   "vocab.txt", "spiece.model")


@dataclass
class RealSpec:
    """What verify reads from a spec (porter.verify.tiny.TinySpec's fields it uses)."""

    max_new_tokens: int = MAX_NEW_TOKENS
    top_logprobs: int = TOP_LOGPROBS
    min_distinct_tokens: int = 1  # real text: a short answer is not a weak check


def read_prompts(path: Path | None) -> list[str]:
    """--prompts FILE: one prompt a line (blank lines skipped), or a JSON list of strings."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise VerifyInputError(f"{path}: cannot read the prompts: {e.strerror}") from e
    if path.suffix == ".json":
        try:
            prompts = json.loads(text)
        except ValueError as e:
            raise VerifyInputError(f"{path}: not JSON: {e}") from e
        if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)):
            raise VerifyInputError(f"{path}: a JSON prompts file holds a list of strings")
    else:
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not prompts:
        raise VerifyInputError(f"{path}: no prompts")
    return prompts


# -- preflight: a bad checkpoint is one line naming the file or tensor ------------------------------


def preflight(ckpt: Path, info: PortInfo) -> dict:
    """Refuse a checkpoint the port cannot be verified on; its config.json as a dict."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise VerifyInputError(f"{ckpt}: no such checkpoint folder")
    cfg = _config(ckpt)
    _check_architecture(ckpt, cfg, info)
    _check_tokenizer(ckpt)
    present = {}
    for f in _safetensors_files(ckpt):
        for name, shape in _safetensors_header(f).items():
            present[name] = (shape, f)
    _check_tensors(ckpt, info, present)
    return cfg


def _config(ckpt: Path) -> dict:
    path = ckpt / "config.json"
    if not path.is_file():
        raise VerifyInputError(f"{path}: missing (not an HF checkpoint folder)")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise VerifyInputError(f"{path}: not JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise VerifyInputError(f"{path}: not a JSON object")
    return cfg


def _check_architecture(ckpt: Path, cfg: dict, info: PortInfo) -> None:
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    served = {info.hf_architecture, info.architecture}
    want_type = info.config_model_type or info.model_type
    if not (set(archs) & served) or model_type != want_type:
        raise VerifyInputError(
            f"{ckpt / 'config.json'}: architecture {', '.join(archs) or 'none'} "
            f"(model_type {model_type}) is not what the port serves: {info.hf_architecture} "
            f"(model_type {want_type})")


def _check_tokenizer(ckpt: Path) -> None:
    if not any((ckpt / f).is_file() for f in TOKENIZER_FILES):
        raise VerifyInputError(
            f"{ckpt}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}): verify feeds the "
            "engine real text through the checkpoint's own tokenizer")


def _safetensors_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise VerifyInputError(f"{index}: unreadable ({type(e).__name__}: {e})") from e
        for n in names:
            if not (ckpt / n).is_file():
                raise VerifyInputError(f"{ckpt / n}: missing (named by {index.name})")
        return [ckpt / n for n in names]
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise VerifyInputError(f"{ckpt}: no *.safetensors file (the engine loads safetensors)")
    return files


def _safetensors_header(path: Path) -> dict[str, list[int]]:
    """name -> shape from the file's header; the file must hold every byte the header promises."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise VerifyInputError(f"{path}: truncated or not a safetensors file "
                                   f"({size} bytes, header of {max(n, 0)} bytes)")
        try:
            header = json.loads(fh.read(n))
        except ValueError as e:
            raise VerifyInputError(f"{path}: not a safetensors file (header: {e})") from e
    have = size - 8 - n
    shapes = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        if end > have:
            raise VerifyInputError(
                f"{path}: truncated: tensor {name} ends at byte {end} of the data, the file holds "
                f"{have}")
        shapes[name] = list(meta["shape"])
    return shapes


def _check_tensors(ckpt: Path, info: PortInfo, present: dict[str, tuple]) -> None:
    from porter.verify.structure import _expected_tensors

    try:
        expected = _expected_tensors(ckpt, info.hf_architecture)
    except Exception as e:  # noqa: BLE001 (the config itself does not build the HF model)
        first = (str(e).strip().splitlines() or [""])[0]
        raise VerifyInputError(f"{ckpt / 'config.json'}: {info.hf_architecture} does not build "
                               f"from it: {type(e).__name__}: {first}") from e
    for name in sorted(expected):
        want = list(expected[name][0])
        if name not in present:
            raise VerifyInputError(
                f"{ckpt}: no tensor {name} in {', '.join(sorted({f.name for _, f in present.values()}))} "
                f"({info.hf_architecture} of config.json needs it, shape {want})")
        shape, f = present[name]
        if shape != want:
            raise VerifyInputError(
                f"{f}: tensor {name} has shape {shape}, config.json implies {want}")


# -- the TP sizes the model's heads allow ---------------------------------------------------------


def split_tps(cfg: dict, tps: list[int]) -> tuple[list[int], dict[int, str]]:
    """(TPs that run, {TP: why skipped}): a TP must divide the attention heads, and the KV heads
    must divide among the ranks or be replicated evenly (TP a multiple of them)."""
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    heads = text.get("num_attention_heads") or text.get("n_head") or text.get("num_heads")
    kv = text.get("num_key_value_heads") or heads
    run, skipped = [], {}
    for tp in tps:
        if heads and heads % tp:
            skipped[tp] = f"{heads} attention heads do not divide among {tp} ranks"
        elif kv and kv % tp and tp % kv:
            skipped[tp] = f"{kv} KV heads neither divide among {tp} ranks nor replicate evenly"
        else:
            run.append(tp)
    return run, skipped


# -- the HF side ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _threads_for_load():
    """One torch thread while the machine is oversubscribed (load >= cores): OpenMP threads
    spinning for a core then cost far more than they bring. Measured here at load ~30 on 2
    cores, 16 greedy steps of SmolLM2-135M: 2 threads 305 s wall (31 s CPU), 1 thread 28 s
    (1.6 s CPU). fp32 either way: a different reduction order moves logprobs by ~1e-7."""
    import torch

    before = torch.get_num_threads()
    loaded = os.getloadavg()[0] >= (os.cpu_count() or 1)
    if loaded:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if loaded:
            torch.set_num_threads(before)


class RealHF:
    """The HF reference on a real checkpoint: prompts, greedy continuations, logprob rows."""

    python = "in-process"

    def __init__(self, ckpt: Path, info: PortInfo, texts: list[str]) -> None:
        import torch
        import transformers

        self.ckpt = Path(ckpt)
        self.spec = RealSpec()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.ckpt))
        except Exception as e:  # noqa: BLE001
            first = (str(e).strip().splitlines() or [""])[0]
            raise VerifyInputError(f"{self.ckpt}: the tokenizer does not load: "
                                   f"{type(e).__name__}: {first}") from e
        cls = getattr(transformers, info.hf_architecture)
        self.model = cls.from_pretrained(str(self.ckpt), dtype=torch.float32,
                                         attn_implementation="eager").eval()
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        self.texts = list(texts)
        self.prompts = [self.encode(t) for t in self.texts]
        with _threads_for_load():
            self.refs = [{"prompt": p, "tokens": self.greedy(p)} for p in self.prompts]

    def encode(self, text: str) -> list[int]:
        tok = self.tokenizer
        if self.chat:
            ids = tok.apply_chat_template([{"role": "user", "content": text}],
                                          add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):  # a BatchEncoding
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        return [int(i) for i in tok(text)["input_ids"]]

    def greedy(self, prompt: list[int]) -> list[int]:
        """MAX_NEW_TOKENS greedy steps with HF's own KV cache (an end-of-turn token does not stop
        them: the engine runs with ignore_eos). The logprobs verify compares come from one full
        forward over each whole sequence (``logprobs``), not from these steps."""
        import torch

        toks: list[int] = []
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([prompt]), use_cache=True)
            while True:
                toks.append(int(out.logits[0, -1].argmax()))
                if len(toks) == self.spec.max_new_tokens:
                    return toks
                out = self.model(input_ids=torch.tensor([toks[-1:]]), use_cache=True,
                                 past_key_values=out.past_key_values)

    def decode(self, tokens: list[int]) -> str:
        """The answer a user reads: up to the first end-of-sequence token."""
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        cut = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
        return self.tokenizer.decode(tokens[:cut], skip_special_tokens=True)

    def checkpoint(self, out_dir: Path, architecture: str) -> Path:
        return with_architecture(self.ckpt, out_dir, architecture)

    def logprobs(self, seqs: list[list[int]]) -> list:
        with _threads_for_load():
            return [hf_logprobs(self.model, s) for s in seqs]

    def experts_routed(self, routers: list[str]) -> dict[str, list[int]]:
        return experts_routed(self.model, self.prompts, routers)


# -- the hooks porter.verify calls ----------------------------------------------------------------


def check_real(report, info: PortInfo, tps: list[int], ckpt: Path, prompts_file: Path | None,
               say) -> tuple[list[int], tuple[Path, list[str]]]:
    """Before the reference: the prompts, the checkpoint (one line naming what is wrong), and the
    TPs its heads allow (the others are reported as skipped, with why)."""
    ckpt = Path(ckpt)
    texts = read_prompts(prompts_file)
    if info.target != "vllm":
        raise VerifyInputError(f"--checkpoint runs the port in vLLM; {report.port_dir} is a "
                               f"{info.target} port")
    from porter.source import installed_transformers_version

    if info.transformers_version not in ("", "unknown", installed_transformers_version()):
        raise VerifyInputError(
            f"--checkpoint needs the HF model in the engine's transformers "
            f"{installed_transformers_version()}; the port came from transformers "
            f"{info.transformers_version} (day zero): verify it without --checkpoint")
    cfg = preflight(ckpt, info)  # (silent and quick: a bad checkpoint is one line, nothing else)
    run, skipped = split_tps(cfg, tps)
    report.checkpoint = str(ckpt)
    report.skipped_tps = {str(tp): why for tp, why in skipped.items()}
    if not run:
        raise VerifyInputError(
            f"{ckpt / 'config.json'}: no TP of {','.join(map(str, tps))} fits the model: "
            + "; ".join(f"TP={tp}: {why}" for tp, why in skipped.items()))
    report.tps = run
    return run, (ckpt, texts)


def real_reference(report, info: PortInfo, say, ckpt: Path, texts: list[str]) -> RealHF:
    say(f"HF reference: {info.hf_architecture} from {ckpt} (eager fp32), "
        f"{len(texts)} prompts x {MAX_NEW_TOKENS} greedy tokens")
    try:
        hf = RealHF(ckpt, info, texts)
    except VerifyInputError:
        raise
    except Exception as e:  # noqa: BLE001 (HF cannot run the checkpoint: nothing to compare with)
        first = (str(e).strip().splitlines() or [""])[0]
        raise VerifyInputError(f"{ckpt}: the HF reference ({info.hf_architecture}) failed: "
                               f"{type(e).__name__}: {first}") from e
    report.hf_side = f"{ckpt} ({info.hf_architecture}, eager fp32, in-process)"
    report.prompt_texts = list(hf.texts)
    report.chat_template = hf.chat
    report.reference_texts = [hf.decode(r["tokens"]) for r in hf.refs]
    return hf
