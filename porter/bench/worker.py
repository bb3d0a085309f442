"""The bench worker process (``python -m porter.bench worker SPEC``): it loads one path (a vLLM
engine, or HF ``generate``) once, then answers JSON commands on stdin, one JSON line each."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def serve(spec: dict) -> None:
    """Load one path, then answer JSON commands on stdin with JSON lines on the saved stdout."""
    reply_fd = os.dup(1)
    os.dup2(2, 1)  # the engine's logs (and its children's) go to stderr, replies stay clean
    reply = os.fdopen(reply_fd, "w", buffering=1)

    def send(obj):
        reply.write(json.dumps(obj) + "\n")
        reply.flush()

    t0 = time.perf_counter()
    try:
        run, describe, steps = (hf_runner if spec["kind"] == "hf" else vllm_runner)(spec)
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
    tree = process_tree(os.getpid())  # the worker and the engine core it started
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        if cmd["op"] == "steps":  # per engine step (vLLM paths)
            n_out, durations = steps(cmd["prompts"], cmd["max_tokens"])
            send({"steps": durations, "n_out": n_out})
            continue
        c = cpu_seconds(tree)
        t = time.perf_counter()
        n_out = run(cmd["prompts"], cmd["max_tokens"])
        send({"s": time.perf_counter() - t, "n_out": n_out, "cpu_s": cpu_seconds(tree) - c})
    reply.flush()
    os._exit(0)


def process_tree(root: int) -> list[int]:
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


def cpu_seconds(pids: list[int]) -> float:
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


def vllm_runner(spec: dict):
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


def hf_runner(spec: dict):
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
