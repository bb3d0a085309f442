"""The second environment of a day-zero verify: the newer transformers (and the local CPU torch).

A port converted from a transformers release newer than the engine's (``porter convert MODEL
--transformers 5.24.0``) cannot get its Hugging Face reference from the engine's environment: that
transformers does not know the model. The reference and the tiny checkpoint are made in a small
venv of that release instead (``.venv-transformers-<version>`` in porter's cache: env_dir), and pass to the
engine side through files (porter/verify/hf_side.py). ``python -m porter.verify.hfenv ROOT`` builds
every venv the committed ports under ROOT need, and one for every day-zero release of
rules/coverage.yaml (the Makefile's test setup runs it; `make demo` does not).

transformers itself is installed with ``--no-deps``; its requirements, read from the release's
wheel, are installed with pip's ordinary resolution, except those in RUNTIME_OPTIONAL: packages
transformers probes for at run time (with a version check) and never needs on this CPU path.
transformers 5.25 requires kernels>=0.19.1,<0.20, which the package index here lacks; without it
``is_kernels_available()`` is False and the hub-kernel paths (GPU attention kernels) stay off, as
they would be on this CPU with any kernels installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TORCH = "torch==2.13.0"  # the engine's torch; the CPU wheel on this machine's wheel folder
# requirements of transformers that are probed at run time, never imported unconditionally
RUNTIME_OPTIONAL = frozenset({"kernels"})


class HFEnvError(Exception):
    """The other environment is missing or broken (verify exit 2)."""


def env_dir(version: str) -> Path:
    """``$PORTER_HF_ENVS/.venv-transformers-<version>``, else the same in porter's cache
    (``$PORTER_CACHE``, else ``~/.cache/porter``: beside the release wheels it is built from), so
    every clone on a machine shares one venv per release."""
    from porter.source import cache_dir

    base = Path(os.environ["PORTER_HF_ENVS"]) if os.environ.get("PORTER_HF_ENVS") else cache_dir() / "hf-envs"
    return base / f".venv-transformers-{version}"


def env_python(version: str) -> Path:
    return env_dir(version) / "bin" / "python"


def _probe(python: Path) -> tuple[str, str | None] | None:
    """(transformers version, torch's CUDA version) of an environment, or None if it is broken."""
    code = "import torch, transformers; print(transformers.__version__); print(torch.version.cuda)"
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    lines = proc.stdout.split()
    return (lines[-2], None if lines[-1] == "None" else lines[-1]) if len(lines) >= 2 else None


def ensure_env(version: str, log=lambda msg: None) -> Path:
    """The python of the venv for transformers VERSION, built from nothing when missing."""
    python = env_python(version)
    if python.is_file():
        probe = _probe(python)
        if probe is not None and probe[0] == version and probe[1] is None:
            return python
    d = env_dir(version)
    log(f"building {d} (transformers {version}, CPU {TORCH})")
    from porter.errors import PorterError
    from porter.source import fetch_wheel

    try:
        wheel = fetch_wheel(version)
    except PorterError as exc:
        raise HFEnvError(f"cannot build {d}: {exc.message}") from None
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(d)],
        [*pip, TORCH, *requirements(wheel)],
        [*pip, "--no-deps", str(wheel)],
    ]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
            raise HFEnvError(f"cannot build {d}: {' '.join(cmd[:4])}...: {tail}")
    probe = _probe(python)
    if probe is None or probe[0] != version:
        raise HFEnvError(f"{d} does not import transformers {version}")
    if probe[1] is not None:
        raise HFEnvError(f"{d} got a CUDA torch ({probe[1]}); the CPU wheel was expected")
    return python


def requirements(wheel: Path) -> list[str]:
    """The unconditional requirements of a transformers wheel (its METADATA's Requires-Dist without
    an extra), less RUNTIME_OPTIONAL."""
    import zipfile
    from email.parser import Parser

    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(zf.read(meta).decode("utf-8"), headersonly=True)
    out = []
    for line in msg.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is not None and "extra" in str(req.marker):
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue
        if req.name.lower() not in RUNTIME_OPTIONAL:
            out.append(str(req))
    return out


def versions_needed(root: Path) -> list[str]:
    """The transformers releases of the committed vLLM ports (those of ROOT/releases/<version>/ too)
    that differ from the installed one."""
    from porter.layout import PORT_JSON, PortInfo
    from porter.source import installed_transformers_version

    here = installed_transformers_version()
    out = set()
    ports = [*(Path(root) / "vllm").glob(f"*/{PORT_JSON}"), *(Path(root) / "releases").glob(f"*/vllm/*/{PORT_JSON}")]
    for p in sorted(ports):
        v = PortInfo.load(p.parent).transformers_version
        if v != here:
            out.add(v)
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]) if args else REPO / "generated"
    from porter.rules_data import day_zero_releases

    for version in sorted(set(versions_needed(root)) | set(day_zero_releases())):
        try:
            python = ensure_env(version, log=lambda m: print(m, flush=True))
        except HFEnvError as exc:
            print(f"porter: error: {exc}", file=sys.stderr)
            return 2
        print(f"{python}: transformers {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
