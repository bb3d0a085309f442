"""`porter serve PORT|MODEL --checkpoint DIR [-- ENGINE-SERVER-ARGS]`: the engine's own
OpenAI-compatible server, running the port on DIR's weights.

The server is vLLM's own (``python -m vllm.entrypoints.openai.api_server``, what ``vllm serve``
runs). The port reaches the engine as it reaches it from ``pip install generated/vllm/<m>``: a
``*.dist-info`` whose entry point in the engine's plugin group (``vllm.general_plugins``) calls the
port's ``register()``, on the server's PYTHONPATH beside the port's package. DIR's config.json
names the HF class (LlamaForCausalLM), so ``--hf-overrides`` tells the engine to build the port's
class (PorterLlamaForCausalLM) instead: the weights, tokenizer and chat template are DIR's own.
Everything after ``--`` goes to the engine's server as given (it wins over porter's defaults).

The server runs in its own process group; porter passes its output through, says what it is
doing until the server answers on /health, and on Ctrl-C / SIGTERM stops the whole group
(SIGTERM, then SIGKILL after a grace period), leaving no process behind.

Aphrodite (``--target aphrodite``): its engine needs a GPU (the wheel has no CPU kernels); on a
machine without one porter says so and does not start it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from porter.errors import PorterError
from porter.layout import PortInfo

GRACE_S = 15.0  # SIGTERM -> SIGKILL
READY_TIMEOUT_S = 1800.0
MILESTONES = ("Resolved architecture", "Starting to load model", "Loading weights took",
              "Model loading took", "init engine", "Starting vLLM API server", "Application startup")


@dataclass
class ServeSpec:
    port_dir: Path
    info: PortInfo
    checkpoint: Path
    host: str = "127.0.0.1"
    port: int = 8000
    tp: int = 1
    extra: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def write_plugin(site: Path, info: PortInfo) -> Path:
    """A dist-info whose entry point loads the port, as `pip install` of the port writes one."""
    d = site / f"{info.package}-0.0.0.dist-info"
    d.mkdir(parents=True, exist_ok=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {info.package}\nVersion: 0.0.0\n")
    (d / "entry_points.txt").write_text(
        f"[{info.plugin_group}]\n{info.package} = {info.package}:register\n")
    return site


def server_env(spec: ServeSpec, site: Path) -> dict:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    ncpu = os.cpu_count() or 1
    if spec.tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env:
        per = max(1, ncpu // spec.tp)
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
            f"{r * per}" if per == 1 else f"{r * per}-{r * per + per - 1}" for r in range(spec.tp))
    paths = [str(site), str(Path(spec.info.path).resolve())]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def server_command(spec: ServeSpec) -> list[str]:
    """vLLM's OpenAI-compatible server (the module `vllm serve` runs: vllm-cpu 0.32's `vllm`
    command itself stops at startup, reading its version from a distribution named "vllm" where
    the package is "vllm-cpu"), the port's class named by --hf-overrides; porter's CPU defaults
    first, the user's ENGINE-SERVER-ARGS after them (the engine's parser takes the last)."""
    overrides = json.dumps({"architectures": [spec.info.architecture]})
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(spec.checkpoint), "--host", spec.host, "--port", str(spec.port),
            "--served-model-name", spec.checkpoint.name,
            "--hf-overrides", overrides, "--dtype", "float32", "--enforce-eager",
            "--tensor-parallel-size", str(spec.tp), *spec.extra]


def check_spec(spec: ServeSpec) -> None:
    """One line (exit 2) for what cannot be served: the target, the TP, the checkpoint."""
    if spec.info.target == "aphrodite":
        import torch

        if not torch.cuda.is_available():
            raise PorterError(
                "Aphrodite's engine cannot run on this machine: it needs a GPU (the "
                "aphrodite-engine wheel has no CPU kernels); serve the vllm port instead "
                "(porter serve MODEL --target vllm)", construct="porter serve --target aphrodite")
        raise PorterError("serving an Aphrodite port is not implemented here (no GPU to test it "
                          "on)", construct="porter serve --target aphrodite")
    from porter.verify.checkpoint import preflight, split_tps
    from porter.verify.tiny import VerifyInputError

    try:
        cfg = preflight(spec.checkpoint, spec.info)
    except VerifyInputError as e:
        raise PorterError(str(e)) from e
    _, skipped = split_tps(cfg, [spec.tp])
    if skipped:
        raise PorterError(f"TP={spec.tp}: {skipped[spec.tp]}", file=str(spec.checkpoint / "config.json"))


def _healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def stop(proc: subprocess.Popen, grace_s: float = GRACE_S) -> int:
    """SIGTERM to the server's process group, SIGKILL to what is left after GRACE_S."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; stragglers of its group too?
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.wait()


def serve(spec: ServeSpec, say=None, out=None) -> int:
    """Run the server until it exits or porter is told to stop; the server's exit code."""
    out = out or sys.stderr
    say = say or (lambda m: (out.write(f"porter serve: {m}\n"), out.flush()))
    check_spec(spec)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="porter-serve-") as tmp:
        site = write_plugin(Path(tmp) / "site", spec.info)
        cmd = server_command(spec)
        say(f"starting vLLM's OpenAI-compatible server with {spec.info.architecture} "
            f"(from {spec.port_dir}) on {spec.checkpoint}, TP={spec.tp}")
        proc = subprocess.Popen(cmd, env=server_env(spec, site), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        say(f"server process group {proc.pid}: python {' '.join(cmd[1:3])} ...")
        stopping = threading.Event()

        def on_signal(signum, _frame):
            stopping.set()

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        pump = threading.Thread(target=_pump, args=(proc, out, say, t0), daemon=True)
        pump.start()
        try:
            ready = False
            while proc.poll() is None and not stopping.is_set():
                if not ready and _healthy(spec.base_url):
                    ready = True
                    say(f"ready after {time.time() - t0:.0f}s: {spec.base_url}/v1 "
                        f"(model {spec.checkpoint.name!r}); Ctrl-C stops it")
                elif not ready and time.time() - t0 > READY_TIMEOUT_S:
                    say(f"not ready after {READY_TIMEOUT_S:.0f}s: stopping it")
                    break
                stopping.wait(1.0)
            if proc.poll() is None:
                say("stopping the server")
            code = stop(proc)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            pump.join(timeout=5)
        say(f"server stopped (exit {code})")
        return 0 if stopping.is_set() else (code or 0)


def _pump(proc: subprocess.Popen, out, say, t0: float) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        out.write(line)
        if any(m in line for m in MILESTONES):
            say(f"{line.split(']', 1)[-1].strip()[:120]} [{time.time() - t0:.0f}s]")
    out.flush()
