"""Installing a port as a package (`pip install generated/vllm/<m>`) leaves the port folder as it
was (its flit_core build writes no build/ or *.egg-info beside it), and `regen --check` still
checks every file of the port: what an install could leave behind is named as a difference."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import GENERATED, run_porter


def _tree(d: Path) -> dict[str, bytes | None]:
    return {p.relative_to(d).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(d.rglob("*"))}


def _copy_port(tmp_path: Path, model: str = "llama") -> tuple[Path, Path]:
    root = tmp_path / "generated"
    port = root / "vllm" / model
    shutil.copytree(GENERATED / "vllm" / model, port,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root, port


def test_pip_install_leaves_the_port_folder_unchanged(tmp_path):
    root, port = _copy_port(tmp_path)
    before = _tree(port)
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                           str(site), str(port)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _tree(port) == before  # no build/, no *.egg-info, nothing rewritten
    dist = [p for p in site.glob("porter_vllm_llama-*.dist-info")]
    assert len(dist) == 1, sorted(p.name for p in site.iterdir())
    entry = (dist[0] / "entry_points.txt").read_text()
    assert "[vllm.general_plugins]" in entry and "porter_vllm_llama:register" in entry
    assert (site / "porter_vllm_llama" / "modeling_llama.py").read_bytes() == (
        port / "porter_vllm_llama" / "modeling_llama.py").read_bytes()
    check = run_porter("regen", "--check", "--root", str(root))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "1 port(s) are what porter makes now" in check.stdout


def test_check_names_build_artefacts_in_a_port(tmp_path):
    root, port = _copy_port(tmp_path)
    left = [port / "build" / "lib" / "porter_vllm_llama" / "__init__.py",
            port / "porter_vllm_llama.egg-info" / "PKG-INFO",
            port / ".pytest_cache" / "README.md"]
    for f in left:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("left by a build\n")
    (port / "porter_vllm_llama" / "__pycache__").mkdir()
    (port / "porter_vllm_llama" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    proc = run_porter("regen", "--check", "--root", str(root))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    named = sorted(ln.removeprefix("differs: ") for ln in proc.stdout.splitlines()
                   if ln.startswith("differs: "))
    # every artefact is named; Python's bytecode cache is the one thing not compared
    assert named == sorted(str(f) for f in left), proc.stdout
