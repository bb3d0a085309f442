"""``run_bench``: the paths of one model measured in sessions of fresh workers, each session's
workers started together, then alternating timed repeats over the live ones (the order shuffled
every repeat), each a prefill and a decode measurement."""

from __future__ import annotations

import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from porter.bench.checkpoint import BENCH_CONFIG, BENCH_OVERRIDES, bench_config, checkpoint, special_ids
from porter.bench.machine import machine
from porter.bench.session import Worker, native_class, port_info, worker_env
from porter.bench.stats import summarize
from porter.bench.workload import PATHS, BenchResult, Workload


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
    from porter.verify.tiny import with_architecture

    t_all = time.time()
    wl = workload or Workload()
    info = port_info(model)
    ckpt, params = checkpoint(info.model_type, info.hf_architecture, log)
    cfg = bench_config(info.model_type)
    long, short = wl.prompts(cfg.vocab_size, special_ids(cfg))
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
    if "native" in paths and native_class(info.hf_architecture) is None:
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
    run = _Sessions(info, wl, res, common, long, short, kv_gb, log, live=list(paths))
    with tempfile.TemporaryDirectory(prefix="porter-bench-") as tmp:
        tmp = Path(tmp)
        run.ckpts = {"port": with_architecture(ckpt, tmp / "port-ckpt", info.architecture), "other": ckpt}
        first_repeat = 0
        for s, count in enumerate(counts):
            run.session(s, first_repeat, count, tmp)
            first_repeat += count
    if run.load:
        res.load = {"min": min(run.load), "median": statistics.median(run.load), "max": max(run.load)}
    res.summary = summarize(res.runs, run.live)
    res.wall_s = round(time.time() - t_all, 1)
    return res


@dataclass
class _Sessions:
    """One bench run's sessions: what they share, the paths still live, the load they saw."""

    info: object  # the port's PortInfo
    wl: Workload
    res: BenchResult
    common: dict  # the worker spec every path shares
    long: list
    short: list
    kv_gb: int
    log: object
    live: list[str]
    ckpts: dict[str, Path] = field(default_factory=dict)  # "port" / "other" -> checkpoint
    load: list[float] = field(default_factory=list)

    def session(self, s: int, first_repeat: int, count: int, tmp: Path) -> None:
        """Session S: its workers started together, then COUNT repeats after one warm-up."""
        order = [n for n in self.live if n != "hf" or first_repeat < self.res.hf_repeats]
        order = order[s % len(order) :] + order[: s % len(order)]
        workers: dict[str, Worker] = {}
        try:
            for name in order:
                # a session's workers start together: nothing is timed before all are
                # ready, and a start is mostly one core's imports (two starts on the two
                # cores take the time of one)
                workers[name] = self._start(name, tmp / f"{name}-{s}")
            self.log(f"{self.info.model_type}: session {s + 1}/{self.res.sessions}: started {', '.join(order)}")
            for name in order:
                self._ready(name, workers[name], tmp / f"{name}-{s}")
            self.live = [n for n in self.live if self.res.paths[n].get("ready")]
            started = [n for n in order if n in self.live]
            for r in range(first_repeat - 1, first_repeat + count):  # the first: warm-up
                self._repeat(r, r < first_repeat, s, started, workers)
        finally:
            for w in workers.values():
                w.close()

    def _start(self, name: str, d: Path) -> Worker:
        from porter.verify.engine import write_plugin_dist

        (d / "probe").mkdir(parents=True)
        site = write_plugin_dist(d / "site", self.info if name == "port" else None)
        spec = dict(
            self.common,
            kind="hf" if name == "hf" else "vllm",
            checkpoint=str(self.ckpts["port" if name == "port" else "other"]),
            model_impl="transformers" if name == "transformers" else "auto",
        )
        env = worker_env(
            None if name == "hf" else site,
            self.info.path if name == "port" else None,
            d / "probe",
            self.kv_gb,
        )
        return Worker(name, spec, env, d / "worker.log")

    def _ready(self, name: str, worker: Worker, d: Path) -> None:
        """Wait for a worker; record its path (a port path that built another class fails)."""
        ready = worker.wait_ready()
        if not ready.get("ready"):
            tail = (d / "worker.log").read_text()[-3000:]
            self.log(f"{self.info.model_type}: {name} failed to start: {ready.get('error')}\n{tail}")
        if name not in self.res.paths or not ready.get("ready"):
            self.res.paths[name] = ready
        if ready.get("ready") and name == "port":
            cls = ready["class"]
            if not cls.startswith(self.info.package + "."):
                self.res.paths["port"]["error"] = f"the engine built {cls}, not the port"
                self.res.paths["port"]["ready"] = False

    def _repeat(self, r: int, warm: bool, s: int, started: list[str], workers: dict[str, Worker]) -> None:
        # a fresh seeded shuffle every repeat: no path always follows the same one
        run_order = [n for n in started if n != "hf" or r < self.res.hf_repeats]
        random.Random(r if not warm else 1000 + s).shuffle(run_order)
        if not warm:
            self.load.append(os.getloadavg()[0])
        for name in run_order:
            run = measure(workers[name], self.long, self.short, self.wl, warm)
            if run is not None:
                self.res.runs.append(
                    dict(run, repeat=r, path=name, session=s, start_position=started.index(name))
                )
        if not warm:
            self.log(f"{self.info.model_type}: repeat {r + 1}/{self.res.repeats} done (load {self.load[-1]:.2f})")


def measure(w: "Worker", long, short, wl: Workload, warm: bool) -> dict | None:
    """Prefill, then decode, on one worker; None for a warm-up call."""
    # Each vLLM worker runs its engine core in-process at TP=1 (no shm message queues, which
    # spin for 1 s after their last message): an idle worker tree used 0.05 CPU-s in 5 s
    # (bench/findings.md). A short pause keeps the previous call's teardown out of this one.
    time.sleep(0.2)
    if warm and w.spec.get("kind") == "hf":  # nothing to warm up but allocations
        w.call(short, 2)
        return None
    if w.spec.get("kind") == "vllm":
        return measure_steps(w, long, short, wl, warm)
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


def measure_steps(w: "Worker", long, short, wl: Workload, warm: bool) -> dict | None:
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
