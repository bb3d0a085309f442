"""The HF side of `porter verify --checkpoint DIR`: DIR's model in eager fp32 with DIR's tokenizer
(and its chat template when it has one), greedy continuations and logprob rows.

It imports only torch, transformers and porter.verify.tiny, so it also runs under the python of
another transformers release (porter/verify/hf_side.py's `real-*` commands): a port converted
from a release newer than the engine's is checked on a real checkpoint against that release's
model, the way porter/verify/hfref.py's OtherEnvHF does for a tiny one.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from porter.verify.tiny import VerifyInputError, experts_routed, from_pretrained_kwargs, hf_logprobs, with_architecture

MAX_NEW_TOKENS = 32
TOP_LOGPROBS = 20


@dataclass
class RealSpec:
    """What verify reads from a spec (porter.verify.tiny.TinySpec's fields it uses)."""

    max_new_tokens: int = MAX_NEW_TOKENS
    top_logprobs: int = TOP_LOGPROBS
    min_distinct_tokens: int = 1  # real text: a short answer is not a weak check


@contextlib.contextmanager
def _threads_for_load():
    """One torch thread while the machine is oversubscribed (load >= cores): OpenMP threads
    spinning for a core then cost far more than they bring. Measured here at load ~30 on 2
    cores, 16 greedy steps of SmolLM2-135M: 2 threads 305 s wall (31 s CPU), 1 thread 28 s
    (1.6 s CPU). fp32 either way: a different reduction order moves logprobs by ~1e-7."""
    import torch

    before = torch.get_num_threads()
    loaded = os.getloadavg()[0] >= (os.cpu_count() or 1)
    if loaded:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if loaded:
            torch.set_num_threads(before)


class RealHF:
    """The HF reference on a real checkpoint: prompts, greedy continuations, logprob rows."""

    python = "in-process"

    def __init__(self, ckpt: Path, hf_architecture: str, texts: list[str], greedy: bool = True) -> None:
        import transformers

        self.ckpt = Path(ckpt)
        self.spec = RealSpec()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.ckpt))
        except Exception as e:  # noqa: BLE001
            first = (str(e).strip().splitlines() or [""])[0]
            raise VerifyInputError(f"{self.ckpt}: the tokenizer does not load: "
                                   f"{type(e).__name__}: {first}") from e
        cls = getattr(transformers, hf_architecture)
        self.model = cls.from_pretrained(str(self.ckpt), **from_pretrained_kwargs()).eval()
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        self.texts = list(texts)
        self.prompts = [self.encode(t) for t in self.texts]
        self.refs: list[dict] = []
        if greedy:
            with _threads_for_load():
                self.refs = [{"prompt": p, "tokens": self.greedy(p)} for p in self.prompts]

    def encode(self, text: str) -> list[int]:
        tok = self.tokenizer
        if self.chat:
            ids = tok.apply_chat_template([{"role": "user", "content": text}],
                                          add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):  # a BatchEncoding
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        return [int(i) for i in tok(text)["input_ids"]]

    def greedy(self, prompt: list[int]) -> list[int]:
        """MAX_NEW_TOKENS greedy steps with HF's own KV cache (an end-of-turn token does not stop
        them: the engine runs with ignore_eos). The logprobs verify compares come from one full
        forward over each whole sequence (``logprobs``), not from these steps."""
        import torch

        toks: list[int] = []
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([prompt]), use_cache=True)
            while True:
                toks.append(int(out.logits[0, -1].argmax()))
                if len(toks) == self.spec.max_new_tokens:
                    return toks
                out = self.model(input_ids=torch.tensor([toks[-1:]]), use_cache=True,
                                 past_key_values=out.past_key_values)

    def eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    def decode(self, tokens: list[int]) -> str:
        """The answer a user reads: up to the first end-of-sequence token."""
        eos = self.eos_ids()
        cut = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
        return self.tokenizer.decode(tokens[:cut], skip_special_tokens=True)

    def checkpoint(self, out_dir: Path, architecture: str) -> Path:
        return with_architecture(self.ckpt, out_dir, architecture)

    def logprobs(self, seqs: list[list[int]]) -> list:
        with _threads_for_load():
            return [hf_logprobs(self.model, s) for s in seqs]

    def experts_routed(self, routers: list[str]) -> dict[str, list[int]]:
        return experts_routed(self.model, self.prompts, routers)
