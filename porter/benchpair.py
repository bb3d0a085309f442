"""Port against native in one engine, one process, step by step: the code, and nothing else.

`porter bench` runs each path in its own process, as a user would. On this 2-core VM that
leaves a floor of noise: a fresh process keeps its own speed for its life (the same GEMMs
15.6 ms in one, 18.3 ms in the next) and the moment moves a paired repeat by ~4.5 % in
decode (bench/findings.md). This instrument removes both, to answer one question: is the
port's code slower than vLLM's own?

    porter bench MODEL --paired [--repeats N] [--json]
    python -m porter.benchpair MODEL... [--repeats N] [--json] [--no-share] [--aa]

One vLLM engine (TP=1, eager, fp32, the bench checkpoint and workload) builds a wrapper model
that holds the port's causal LM and vLLM's native one side by side. Every forward the engine
asks for runs both, one right after the other, the order flipped each step, each timed by
itself; the engine samples from the port's logits. Each model fills its own KV cache from
the same tokens, so both do a full forward at every step. After loading, the native model's
parameters are made views of the port's where name and shape agree (the same parameter tree:
vLLM's layer names): both read the very same memory, so where the weights landed cannot
favour one. Reported: per step kind (prefill, decode), the median over steps of the paired
ratio t(native) / t(port) (> 1: the port is faster), its bootstrap 95 % interval, and
sum(t native) / sum(t port).

What it does not measure: the engine around the model (scheduler, sampler, input prep), which
is the same code for both and is in `porter bench`'s numbers.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

PAIR_ARCH = "PorterPairForCausalLM"


def _load_class(spec: str):
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


class PairForCausalLM(nn.Module):
    """The port's causal LM and vLLM's native one, run one after the other on every forward."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__()
        from vllm.model_executor.models.utils import maybe_prefix

        port_cls = _load_class(os.environ["PORTER_PAIR_PORT"])
        native_cls = _load_class(os.environ["PORTER_PAIR_NATIVE"])
        self.port = port_cls(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "port"))
        self.native = native_cls(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "native"))
        self.share = os.environ.get("PORTER_PAIR_SHARE", "1") == "1"
        self.records: list[tuple[int, str, float, float]] = []  # (tokens, first, t port, t native)
        self.shared_tensors = 0
        self._flip = False

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.port.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kw):
        order = ("native", "port") if self._flip else ("port", "native")
        self._flip = not self._flip
        out, took = {}, {}
        for name in order:
            t = time.perf_counter()
            out[name] = getattr(self, name)(input_ids, positions, intermediate_tensors, inputs_embeds, **kw)
            took[name] = time.perf_counter() - t
        n = int(positions.shape[-1])
        self.records.append((n, order[0], took["port"], took["native"]))
        return out["port"]

    def compute_logits(self, hidden_states: torch.Tensor):
        return self.port.compute_logits(hidden_states)

    def load_weights(self, weights):
        weights = list(weights)
        loaded = {f"port.{n}" for n in self.port.load_weights(iter(weights))}
        loaded |= {f"native.{n}" for n in self.native.load_weights(iter(weights))}
        if self.share:
            mine = dict(self.port.named_parameters())
            for name, p in self.native.named_parameters():
                q = mine.get(name)
                if q is not None and q.shape == p.shape and q.dtype == p.dtype:
                    p.data = q.data
                    self.shared_tensors += 1
        return loaded


def _records(model) -> dict:
    return {"records": model.records, "shared": model.shared_tensors,
            "params": sum(1 for _ in model.native.parameters())}


def summarize(records: list, decode_batch: int) -> dict:
    """Per step kind: a decode step holds one token per running request (at most the decode
    batch), a prefill step the prompts."""
    from porter.bench.stats import bootstrap_median_ci

    out = {}
    for kind, keep in (("prefill", lambda n: n > decode_batch), ("decode", lambda n: n <= decode_batch)):
        rows = [r for r in records if keep(r[0])]
        if len(rows) < 2:
            continue
        ratios = [tn / tp for _, _, tp, tn in rows]
        by_first = {f: [tn / tp for _, first, tp, tn in rows if first == f] for f in ("port", "native")}
        out[kind] = {
            "steps": len(rows),
            "native_over_port_median": statistics.median(ratios),
            "ci95": bootstrap_median_ci(ratios),
            "native_over_port_sum": sum(r[3] for r in rows) / sum(r[2] for r in rows),
            "port_ms_median": 1000 * statistics.median(r[2] for r in rows),
            "native_ms_median": 1000 * statistics.median(r[3] for r in rows),
            "median_when_port_first": statistics.median(by_first["port"]) if by_first["port"] else None,
            "median_when_native_first": statistics.median(by_first["native"]) if by_first["native"] else None,
        }
    return out


def run(model: str, repeats: int = 20, share: bool = True, aa: bool = False) -> dict:
    """In a fresh process (the engine needs a __main__ guard and its own environment)."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="porter-pair-") as tmp:
        env, args = _setup(model, Path(tmp), share, aa)
        args["repeats"] = repeats
        proc = subprocess.run([sys.executable, "-m", "porter.benchpair", "--child", json.dumps(args)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"paired run failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1]) | {"repeats": repeats}


def _setup(model: str, tmp: Path, share: bool, aa: bool = False) -> tuple[dict, dict]:
    from porter.bench.checkpoint import bench_config, checkpoint, special_ids
    from porter.bench.session import native_class, worker_env
    from porter.bench.workload import Workload
    from porter.layout import PortInfo
    from porter.verify import resolve_port

    port_dir = resolve_port(model)
    info = PortInfo.load(port_dir)
    native = native_class(info.hf_architecture)
    if native is None:
        from porter.errors import PorterError

        raise PorterError(f"vLLM has no native class for {info.hf_architecture}: nothing to pair the port with",
                          file=str(port_dir / "PORT.json"), construct="porter bench --paired")
    ckpt, params = checkpoint(info.model_type, info.hf_architecture)
    wl = Workload()
    cfg = bench_config(info.model_type)
    long, short = wl.prompts(cfg.vocab_size, special_ids(cfg))
    (tmp / "probe").mkdir()
    env = worker_env(None, port_dir.resolve(), tmp / "probe", 2)
    env.update(PORTER_PAIR_PORT=native if aa else f"{info.module}:{info.hf_architecture}",
               PORTER_PAIR_NATIVE=native,
               PORTER_PAIR_SHARE="1" if share else "0")
    args = {"checkpoint": str(ckpt), "long": long, "short": short, "params": params, "workload": asdict(wl),
            "port": env["PORTER_PAIR_PORT"], "native": env["PORTER_PAIR_NATIVE"]}
    return env, args


def _child(args: dict) -> dict:
    from vllm import LLM, ModelRegistry, SamplingParams
    from vllm.inputs import TokensPrompt

    from porter.bench.workload import Workload

    ModelRegistry.register_model(PAIR_ARCH, PairForCausalLM)
    wl = Workload(**args["workload"])
    llm = LLM(model=args["checkpoint"], hf_overrides={"architectures": [PAIR_ARCH]},
              dtype="float32", enforce_eager=True, tensor_parallel_size=1, skip_tokenizer_init=True,
              enable_prefix_caching=False, seed=0, **wl.engine_limits())

    def go(prompts, max_tokens):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)

    go(args["long"], 1)
    go(args["short"], wl.decode_tokens)  # warm-up
    llm.apply_model(lambda m: m.records.clear())
    t0 = time.time()
    for _ in range(args["repeats"]):
        for _ in range(wl.prefill_calls):
            go(args["long"], 1)
        go(args["short"], wl.decode_tokens)
    got = llm.apply_model(_records)[0]
    res = summarize(got["records"], wl.decode_batch)
    return {"summary": res, "shared_tensors": got["shared"], "native_params": got["params"],
            "steps": len(got["records"]), "wall_s": round(time.time() - t0, 1),
            "port_class": args["port"], "native_class": args["native"],
            "load1": round(os.getloadavg()[0], 2)}


def render(model: str, r: dict) -> str:
    lines = [f"{model}: port `{r['port_class']}` vs native `{r['native_class']}`, one engine, "
             f"{r['repeats']} repeats, {r['steps']} steps, {r['shared_tensors']}/{r['native_params']} "
             f"native parameters sharing the port's memory, load {r['load1']}"]
    for kind, s in r["summary"].items():
        ci = s["ci95"] or [float("nan")] * 2  # none below 5 steps
        lines.append(
            f"  {kind:7} t(native)/t(port) median {s['native_over_port_median']:.4f} "
            f"(95 % CI {ci[0]:.4f}-{ci[1]:.4f}; port first {s['median_when_port_first']:.4f}, "
            f"native first {s['median_when_native_first']:.4f}), sum ratio {s['native_over_port_sum']:.4f}, "
            f"{s['steps']} steps, port {s['port_ms_median']:.2f} ms vs native {s['native_ms_median']:.2f} ms")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        args = json.loads(argv[1])
        out = _child(args)
        print(json.dumps(out), flush=True)
        os._exit(0)  # the engine's threads need no orderly teardown
    import argparse

    ap = argparse.ArgumentParser(prog="python -m porter.benchpair")
    ap.add_argument("models", nargs="+")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-share", action="store_true", help="native keeps its own copy of the weights")
    ap.add_argument("--aa", action="store_true",
                    help="control: vLLM's native class in both slots (the instrument's own bias and spread)")
    a = ap.parse_args(argv)
    results = {}
    for model in a.models:
        results[model] = run(model, a.repeats, share=not a.no_share, aa=a.aa)
        if not a.json:
            print(render(model, results[model]), flush=True)
    if a.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
