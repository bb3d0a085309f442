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

The package, one module per job:

- ``workload``: the paths, the workload (prompts, engine limits) and the result record
- ``checkpoint``: the ~100M-parameter bench checkpoint (random weights, built once per config)
- ``machine``: what the machine is (CPU, memory, package versions)
- ``worker``: the worker process: loads one path, then answers commands (``python -m porter.bench worker SPEC``)
- ``session``: the parent's side of a worker, its environment, a path set up by itself (profiling)
- ``run``: ``run_bench``: sessions of workers, alternating timed repeats, one measurement
- ``stats``: medians, paired ratios, bootstrap intervals
- ``table``: the text table and the JSON
"""

from porter.bench.checkpoint import BENCH_CONFIG, BENCH_OVERRIDES, bench_config, checkpoint, special_ids
from porter.bench.machine import machine
from porter.bench.run import run_bench
from porter.bench.session import Worker, native_class, port_info, single_path, worker_env
from porter.bench.stats import bootstrap_median_ci, summarize
from porter.bench.table import render, to_json
from porter.bench.worker import vllm_runner
from porter.bench.workload import PATHS, BenchResult, Workload

__all__ = [
    "BENCH_CONFIG", "BENCH_OVERRIDES", "PATHS", "BenchResult", "Worker", "Workload", "bench_config",
    "bootstrap_median_ci", "checkpoint", "machine", "native_class", "port_info", "render", "run_bench",
    "single_path", "special_ids", "summarize", "to_json", "vllm_runner", "worker_env",
]
