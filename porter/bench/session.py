"""The parent's side of the bench workers: a handle on one worker process, its environment, the
port a model names, vLLM's own class for it, and one path set up by itself (for bench/'s
profiling scripts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from porter.bench.checkpoint import bench_config, checkpoint, special_ids
from porter.bench.workload import Workload


class Worker:
    def __init__(self, name: str, spec: dict, env: dict, log_path: Path):
        self.name, self.spec = name, spec
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "porter.bench", "worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            cwd=str(log_path.parent),
            start_new_session=True,
        )
        self.ready: dict | None = None

    def wait_ready(self, timeout: float = 900) -> dict:
        box: list = []
        t = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        line = box[0] if box else ""
        try:
            self.ready = json.loads(line) if line else {"ready": False, "error": "no reply"}
        except ValueError:
            self.ready = {"ready": False, "error": f"bad reply {line[:200]!r}"}
        if not self.ready.get("ready") and self.proc.poll() is not None:
            self.ready.setdefault("error", f"exited with {self.proc.returncode}")
        return self.ready

    def call(self, prompts, max_tokens, op: str = "run") -> dict:
        self.proc.stdin.write(
            json.dumps({"op": op, "prompts": prompts, "max_tokens": max_tokens}) + "\n"
        )
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker died (log: {self.log.name})")
        return json.loads(line)

    def close(self) -> None:
        import signal

        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=5)
        except Exception:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the worker's own group only
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


def worker_env(site: Path | None, port_path: Path | None, probe_dir: Path, kv_gb: int) -> dict:
    from porter.verify.engine import _env as verify_env

    pythonpath = ([site] if site else []) + ([port_path] if port_path else [])
    env = verify_env(1, pythonpath, probe_dir)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_gb)
    return env


def port_info(model: str):
    """The PortInfo of MODEL's port, with its resolved directory as ``path``."""
    from porter.layout import PortInfo
    from porter.verify import resolve_port

    port_dir = resolve_port(model)
    info = PortInfo.load(port_dir)
    info.path = port_dir.resolve()
    return info


def single_path(model: str, path: str, tmp: Path) -> tuple[dict, dict, Workload, list, list]:
    """One bench path set up by itself in ``tmp`` (for the profiling scripts in bench/): its
    worker spec and environment, the workload and its long and short prompts, built from the
    bench checkpoint the way ``run_bench`` builds its workers."""
    from porter.verify.engine import write_plugin_dist
    from porter.verify.tiny import with_architecture

    wl = Workload()
    info = port_info(model)
    ckpt, _ = checkpoint(info.model_type, info.hf_architecture)
    cfg = bench_config(info.model_type)
    long, short = wl.prompts(cfg.vocab_size, special_ids(cfg))
    (tmp / "probe").mkdir(parents=True, exist_ok=True)
    site = write_plugin_dist(tmp / "site", info if path == "port" else None)
    ck = with_architecture(ckpt, tmp / "ck", info.architecture) if path == "port" else ckpt
    spec = {
        "enforce_eager": True,
        **wl.engine_limits(),
        "hf_architecture": info.hf_architecture,
        "kind": "hf" if path == "hf" else "vllm",
        "checkpoint": str(ck),
        "model_impl": "transformers" if path == "transformers" else "auto",
    }
    env = worker_env(
        None if path == "hf" else site, info.path if path == "port" else None, tmp / "probe", 2
    )
    return spec, env, wl, long, short


def native_class(hf_architecture: str) -> str | None:
    """vLLM's own class for an architecture as "module:Class", or None (looked up in a child
    process: importing vLLM here would put its start-up logs on this command's stderr)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from vllm.model_executor.models.registry import _TEXT_GENERATION_MODELS as m;"
            "e = m.get(sys.argv[1]); print(f'vllm.model_executor.models.{e[0]}:{e[1]}' if e else '')",
            hf_architecture,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stdout.strip().splitlines() if proc.returncode == 0 else []
    return lines[-1] if lines and lines[-1] else None
