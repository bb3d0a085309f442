"""What a bench run measures and what it records: the paths, the workload and the result."""

from __future__ import annotations

from dataclasses import dataclass, field

PATHS = ("port", "native", "transformers", "hf")


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
