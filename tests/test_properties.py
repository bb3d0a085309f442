"""Property tests (hypothesis) over Llama-family configs: heads, kv heads (including fewer kv
heads than TP ranks, which then replicate), head_dim 32/64, tied or untied embeddings, biases on
or off, TP 1 and 2.

Structural and fast: a worker process (this file run as a script; engine state is per process)
builds the committed vLLM llama port in-process for each drawn config and checks every
parameter's per-rank shape against the tensor-parallel formulas (QKVParallelLinear's head split
and kv replication, column/row-parallel splits, vocab padding), and the port's q_size/kv_size
against them. TP=2 is built in the same process as rank 0 and rank 1 of a world of 2 (vLLM's
tensor-parallel size/rank queries answer 2 and r; nothing runs). Plus a few drawn configs
verified end to end in the real engine (porter verify's machinery, TP=1).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import run_group
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
PORT = ROOT / "generated" / "vllm" / "llama"
EXAMPLES = int(os.environ.get("PORTER_HYPOTHESIS_EXAMPLES", "120"))


@st.composite
def llama_configs(draw):
    heads = draw(st.sampled_from([2, 4, 8]))
    kv = draw(st.sampled_from([d for d in (1, 2, 4, 8) if heads % d == 0]))
    return {
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": draw(st.sampled_from([32, 64])),
        "hidden_size": draw(st.sampled_from([64, 128])),
        "intermediate_size": draw(st.sampled_from([64, 192])),
        "vocab_size": draw(st.sampled_from([512, 515])),  # 515: vocab padding per rank
        "tie_word_embeddings": draw(st.booleans()),
        "attention_bias": draw(st.booleans()),
        "mlp_bias": draw(st.booleans()),
        "num_hidden_layers": 2,
        "max_position_embeddings": 256,
    }


def expected_shapes(cfg: dict, tp: int, rank: int) -> dict[str, list[int]]:
    """Per-rank parameter shapes of a Llama port at tensor-parallel size ``tp``."""
    h, hd, inter = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    nh = heads // tp
    nkv = 1 if kv < tp else kv // tp  # fewer kv heads than ranks: each rank holds one replica
    vocab = -(-cfg["vocab_size"] // 64) * 64 // tp  # vocab padded to a multiple of 64, then split
    out = {"model.embed_tokens.weight": [vocab, h], "model.norm.weight": [h]}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "self_attn.qkv_proj.weight"] = [(nh + 2 * nkv) * hd, h]
        out[p + "self_attn.o_proj.weight"] = [h, nh * hd]
        if cfg["attention_bias"]:
            out[p + "self_attn.qkv_proj.bias"] = [(nh + 2 * nkv) * hd]
            out[p + "self_attn.o_proj.bias"] = [h]
        out[p + "mlp.gate_up_proj.weight"] = [2 * inter // tp, h]
        out[p + "mlp.down_proj.weight"] = [h, inter // tp]
        if cfg["mlp_bias"]:
            out[p + "mlp.gate_up_proj.bias"] = [2 * inter // tp]
            out[p + "mlp.down_proj.bias"] = [h]
        out[p + "input_layernorm.weight"] = [h]
        out[p + "post_attention_layernorm.weight"] = [h]
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = [vocab, h]
    return out


# ---- the worker ----------------------------------------------------------------------------


def _worker(out_path: str) -> None:
    import tempfile

    import transformers

    from porter.verify import structure as S

    info, cls = S.find_port_class(PORT)
    import vllm.distributed.parallel_state as ps

    world = {"size": 1, "rank": 0}
    patched = 0
    for mod in list(sys.modules.values()):  # every module that imported the TP queries by name
        if mod is None or not getattr(mod, "__name__", "").startswith(("vllm", info.package)):
            continue
        for name, fn in (("get_tensor_model_parallel_world_size", lambda: world["size"]),
                         ("get_tensor_model_parallel_rank", lambda: world["rank"])):
            if hasattr(mod, name):
                setattr(mod, name, fn)
                patched += 1
    del ps
    tmp = Path(tempfile.mkdtemp(prefix="porter-props-"))
    stats = {"examples": 0, "builds": 0, "tp2_builds": 0, "replicated_kv": 0, "patched": patched}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(cfg=llama_configs())
    def check(cfg):
        stats["examples"] += 1
        d = tmp / f"c{stats['examples']}"
        config = transformers.AutoConfig.for_model("llama", **cfg)
        config.architectures = ["LlamaForCausalLM"]
        config.save_pretrained(d)
        for tp in (1, 2):
            if cfg["num_attention_heads"] % tp or cfg["intermediate_size"] % tp:
                continue
            for rank in range(tp):
                world.update(size=tp, rank=rank)
                try:
                    model = S.build_inprocess("vllm", d, cls)
                finally:
                    world.update(size=1, rank=0)
                got = {n: list(p.shape) for n, p in model.named_parameters()}
                want = expected_shapes(cfg, tp, rank)
                assert got == want, (cfg, tp, rank, {k: (got.get(k), want.get(k))
                                                     for k in set(got) | set(want) if got.get(k) != want.get(k)})
                attn = model.model.layers[0].self_attn
                nkv = 1 if cfg["num_key_value_heads"] < tp else cfg["num_key_value_heads"] // tp
                assert attn.q_size == cfg["num_attention_heads"] // tp * cfg["head_dim"], (cfg, tp)
                assert attn.kv_size == nkv * cfg["head_dim"], (cfg, tp)
                stats["builds"] += 1
                stats["tp2_builds"] += tp == 2
                stats["replicated_kv"] += cfg["num_key_value_heads"] < tp

    check()
    Path(out_path).write_text(json.dumps(stats))


@pytest.fixture(scope="module")
def worker_stats(tmp_path_factory):
    out = tmp_path_factory.mktemp("props") / "stats.json"
    proc = run_group([sys.executable, __file__, "worker", str(out)], timeout=1800,
                     env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def test_port_shapes_match_the_tp_formulas(worker_stats, capsys):
    s = worker_stats
    with capsys.disabled():
        print(f"\n[hypothesis] {s['examples']} configs, {s['builds']} in-process builds "
              f"({s['tp2_builds']} as TP=2 ranks, {s['replicated_kv']} with replicated kv heads)")
    assert s["examples"] >= min(EXAMPLES, 30)
    assert s["tp2_builds"] > 0 and s["replicated_kv"] > 0


@settings(max_examples=200, deadline=None)
@given(cfg=llama_configs(), tp=st.sampled_from([1, 2]))
def test_tp_formulas_partition_the_full_model(cfg, tp):
    """Per-rank shapes put together give the full (TP=1) model; replicated kv heads are whole."""
    if cfg["num_attention_heads"] % tp or cfg["intermediate_size"] % tp:
        return
    full = expected_shapes(cfg, 1, 0)
    ranks = [expected_shapes(cfg, tp, r) for r in range(tp)]
    assert all(r.keys() == full.keys() for r in ranks)
    hd = cfg["head_dim"]
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    q_rows = sum(cfg["num_attention_heads"] // tp * hd for _ in ranks)
    assert q_rows == cfg["num_attention_heads"] * hd
    kv_rows = sum(r[qkv][0] for r in ranks) - q_rows
    assert kv_rows >= 2 * cfg["num_key_value_heads"] * hd  # equal, or replicas when kv < tp
    assert sum(r["model.layers.0.mlp.down_proj.weight"][1] for r in ranks) == cfg["intermediate_size"]


def sampled_engine_configs(n: int = 2, seed: int = 11) -> list[dict]:
    """``n`` configs drawn (seeded) from the same space, kept where a CPU engine run proves
    something: GQA exercised (kv < heads), the first with fewer kv heads than TP=2 ranks."""
    import random

    rng = random.Random(seed)
    out: list[dict] = []
    while len(out) < n:
        heads = rng.choice([2, 4, 8])
        kv = rng.choice([d for d in (1, 2, 4) if heads % d == 0 and d < heads])
        if not out and kv != 1:
            continue
        out.append({"num_attention_heads": heads, "num_key_value_heads": kv,
                    "head_dim": rng.choice([32, 64]), "hidden_size": rng.choice([64, 128]),
                    "intermediate_size": rng.choice([64, 192]),
                    "tie_word_embeddings": rng.random() < 0.5,
                    "attention_bias": rng.random() < 0.5, "mlp_bias": rng.random() < 0.5})
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("overrides", sampled_engine_configs(),
                         ids=lambda c: "h{num_attention_heads}kv{num_key_value_heads}d{head_dim}".format(**c))
def test_sampled_config_verifies_in_the_engine(overrides, monkeypatch, capsys):
    import time

    from porter.verify import render_report, run_verify

    monkeypatch.setenv("PORTER_TINY_OVERRIDES", json.dumps(overrides))
    t0 = time.time()
    report = run_verify(PORT, tps=[1, 2])
    with capsys.disabled():
        print(f"\n[hypothesis e2e] {overrides}: exit {report.exit_code} in {time.time() - t0:.0f}s: "
              f"{report.reason}")
    assert report.exit_code == 0, render_report(report, json=False)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    sys.path.insert(0, str(ROOT))
    _worker(sys.argv[2])
