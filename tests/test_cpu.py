"""vLLM's CPU kernels are loaded the way vLLM loads them (porter/verify/cpu.py), on any CPU of the
kind CI runs on: AVX-512 with BF16, AVX-512 without, or AVX2 only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from porter.verify.cpu import cpu_features, cpu_flags, describe, kernel_module
from porter.verify.report import VerifyReport, render_report

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_choice_follows_vllm_for_every_cpu_kind():
    # vllm/platforms/cpu.py CpuPlatform.import_kernels: the same three x86 cases, and _C elsewhere
    assert kernel_module("x86_64", avx512=True, avx512_bf16=True) == "vllm._C"
    assert kernel_module("x86_64", avx512=True, avx512_bf16=False) == "vllm._C_AVX512"
    assert kernel_module("x86_64", avx512=False) == "vllm._C_AVX2"
    assert kernel_module("x86_64", avx512=False, avx512_bf16=True) == "vllm._C_AVX2"
    assert kernel_module("aarch64") == "vllm._C"


def test_the_choice_on_this_machine_is_vllms():
    import torch

    want = ("vllm._C_AVX2" if not torch.cpu._is_avx512_supported()
            else "vllm._C" if torch.cpu._is_avx512_bf16_supported() else "vllm._C_AVX512")
    assert kernel_module() == want
    assert cpu_features()["kernels"] == want.removeprefix("vllm.")


def test_the_avx2_build_loads_and_registers_the_kernels():
    # every machine of this kind has AVX2: what an AVX2-only CPU loads is checked on any of them
    code = ("from porter.verify.cpu import load_kernels; import torch; "
            "print(load_kernels('vllm._C_AVX2'), callable(torch.ops._C.rms_norm))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["vllm._C_AVX2", "True"], out.stdout


def test_the_default_load_is_this_cpus_build():
    code = "from porter.verify.cpu import load_kernels; print(load_kernels())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == kernel_module()


def test_no_module_imports_a_kernel_library_by_name():
    offenders = []
    for path in sorted((ROOT / "porter").rglob("*.py")):
        if path.name == "cpu.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = [node.value]
            if any(n.startswith("vllm._C") for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_cpu_flags_and_the_report_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: x\n")
    assert cpu_flags(info) == {"fpu", "sse", "avx", "avx2", "fma"}
    assert cpu_flags(tmp_path / "missing") == set()
    feats = {"arch": "x86_64", "flags": ["avx2"], "kernels": "_C_AVX2"}
    assert describe(feats) == "x86_64 avx2 (vLLM kernels _C_AVX2)"
    report = VerifyReport(port_dir="x", tps=[1], cpu=feats, reason="no run")
    assert "CPU: x86_64 avx2 (vLLM kernels _C_AVX2)" in render_report(report)
    assert '"kernels": "_C_AVX2"' in render_report(report, json=True)
