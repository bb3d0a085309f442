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

import json
from pathlib import Path

from porter.layout import PortInfo
from porter.verify.realhf import MAX_NEW_TOKENS, RealHF, RealSpec
from porter.verify.tiny import VerifyInputError, with_architecture
# real questions; the answers run past 32 tokens, so every greedy step is text, not what the
# model says after its end-of-turn token
DEFAULT_PROMPTS = (
    "What is the capital of France? Answer in two sentences and say why it is famous.",
    "Write a short poem about the sea.",
    "Explain in a few sentences how a bicycle works.",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model",
                   "vocab.txt", "spiece.model")


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


class OtherEnvRealHF:
    """RealHF run by the python of the port's own transformers release (a port converted from a
    release newer than the engine's): each question is one `porter.verify.hf_side real-*` run."""

    def __init__(self, python: Path, workdir: Path, ckpt: Path, hf_architecture: str, texts: list[str]) -> None:
        self.python, self.work, self.ckpt = Path(python), Path(workdir), Path(ckpt)
        self.work.mkdir(parents=True, exist_ok=True)
        self.args = ["--workdir", str(self.work), "--checkpoint", str(self.ckpt),
                     "--hf-architecture", hf_architecture]
        self.spec = RealSpec()
        self.texts = list(texts)
        (self.work / "texts.json").write_text(json.dumps(self.texts))
        self._run("real-reference")
        data = json.loads((self.work / "real.json").read_text())
        self.prompts, self.refs, self.chat = data["prompts"], data["refs"], data["chat"]
        self._decoded = {tuple(r["tokens"]): t for r, t in zip(self.refs, data["texts"])}

    def _run(self, command: str) -> None:
        from porter.verify.hfref import run_side

        run_side(self.python, "hf_side", [command, *self.args], f"HF side ({self.python}) {command}")

    def decode(self, tokens: list[int]) -> str:
        key = tuple(tokens)
        if key not in self._decoded:
            (self.work / "decode.json").write_text(json.dumps([list(tokens)]))
            self._run("real-decode")
            self._decoded[key] = json.loads((self.work / "decoded.json").read_text())[0]
        return self._decoded[key]

    def checkpoint(self, out_dir: Path, architecture: str) -> Path:
        return with_architecture(self.ckpt, out_dir, architecture)

    def logprobs(self, seqs: list[list[int]]) -> list:
        import torch

        (self.work / "sequences.json").write_text(json.dumps(seqs))
        self._run("real-logprobs")
        return torch.load(self.work / "rows.pt")

    def experts_routed(self, routers: list[str]) -> dict[str, list[int]]:
        (self.work / "routers.json").write_text(json.dumps(routers))
        self._run("real-routed")
        return json.loads((self.work / "routed.json").read_text())


def _release_python(info: PortInfo) -> Path | None:
    """The python of the port's transformers release when it is not the engine's (None when it is)."""
    from porter.source import installed_transformers_version
    from porter.verify.hfenv import env_dir, env_python

    if info.transformers_version in ("", "unknown", installed_transformers_version()):
        return None
    python = env_python(info.transformers_version)
    if not python.is_file():
        raise VerifyInputError(
            f"--checkpoint: the port came from transformers {info.transformers_version}, not the "
            f"engine's {installed_transformers_version()}: its HF reference runs in "
            f"{env_dir(info.transformers_version)}, which is missing (make setup builds it; or "
            "python -m porter.verify.hfenv)")
    return python


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
    _release_python(info)  # (a missing release venv is one line before anything runs)
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


def real_reference(report, info: PortInfo, say, ckpt: Path, texts: list[str],
                   work: Path | None = None) -> RealHF | OtherEnvRealHF:
    python = _release_python(info)
    where = "in-process" if python is None else f"transformers {info.transformers_version}, {python}"
    say(f"HF reference: {info.hf_architecture} from {ckpt} (eager fp32, {where}), "
        f"{len(texts)} prompts x {MAX_NEW_TOKENS} greedy tokens")
    try:
        if python is None:
            hf = RealHF(ckpt, info.hf_architecture, texts)
        else:
            import tempfile

            hf = OtherEnvRealHF(python, Path(work or tempfile.mkdtemp(prefix="porter-real-")) / "hf-real",
                                ckpt, info.hf_architecture, texts)
    except VerifyInputError:
        raise
    except Exception as e:  # noqa: BLE001 (HF cannot run the checkpoint: nothing to compare with)
        first = (str(e).strip().splitlines() or [""])[0]
        raise VerifyInputError(f"{ckpt}: the HF reference ({info.hf_architecture}) failed: "
                               f"{type(e).__name__}: {first}") from e
    report.hf_side = f"{ckpt} ({info.hf_architecture}, eager fp32, {where})"
    report.prompt_texts = list(hf.texts)
    report.chat_template = hf.chat
    report.reference_texts = [hf.decode(r["tokens"]) for r in hf.refs]
    return hf
