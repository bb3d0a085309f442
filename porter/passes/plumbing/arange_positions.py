"""PT039 arange-positions: the rule `ArangePositions`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst

from porter.analysis.arange_positions import arange_positions
from porter.passes.base import Example
from porter.passes.plumbing.mask_positions import MaskPositions


class ArangePositions(MaskPositions):
    code = "PT039"
    name = "arange-positions"
    why = (
        "BART-style learned position embeddings (TrOCR's) take the input ids and the cache length and "
        "build their positions themselves when none are given: `arange(past, past + seq_len)` for "
        "every row, read from the input's shape only. Those are the new tokens' absolute positions, "
        "the engine's `positions` (shown by running the forward on sample sizes with two cache "
        "lengths, porter/analysis/arange_positions.py). The module's forward takes `positions` "
        "instead of the input and the cache length (the statements building them go), its callers "
        "pass `positions=positions` instead, and PT031 threads `positions` down to them."
    )
    examples = [
        Example(
            "class Pos(nn.Embedding):\n"
            "    def forward(self, input_ids, past_key_values_length=0, position_ids=None):\n"
            "        if position_ids is None:\n"
            "            bsz, seq_len = input_ids.shape[:2]\n"
            "            position_ids = torch.arange(past_key_values_length, past_key_values_length + seq_len, "
            "device=self.weight.device).expand(bsz, -1)\n"
            "        else:\n            position_ids = position_ids.unsqueeze(0)\n"
            "        return super().forward(position_ids + self.offset)\n\n\n"
            "class Decoder(nn.Module):\n"
            "    def __init__(self, config):\n        self.embed_positions = Pos(config.n, config.d)\n\n"
            "    def forward(self, input_ids, past_key_values_length):\n"
            "        return self.embed_positions(input_ids, past_key_values_length=past_key_values_length)\n",
            "class Pos(nn.Embedding):\n"
            "    def forward(self, positions: torch.Tensor):\n"
            "        return super().forward(positions + self.offset)\n\n\n"
            "class Decoder(nn.Module):\n"
            "    def __init__(self, config):\n        self.embed_positions = Pos(config.n, config.d)\n\n"
            "    def forward(self, input_ids, past_key_values_length):\n"
            "        return self.embed_positions(positions=positions)\n",
        ),
        # the config chooses between it and a module whose positions are not the engine's (TrOCR's
        # sinusoidal table counts them over the non-padding input ids): that arm refuses at load
        Example(
            "class Pos(nn.Embedding):\n"
            "    def forward(self, input_ids, past_key_values_length=0):\n"
            "        bsz, seq_len = input_ids.shape[:2]\n"
            "        position_ids = torch.arange(past_key_values_length, past_key_values_length + seq_len)\n"
            "        return super().forward(position_ids + 2)\n\n\n"
            "class Sin(nn.Module):\n"
            "    def forward(self, input_ids, past_key_values_length=0):\n"
            "        return self.weights[input_ids.ne(1).cumsum(1) + past_key_values_length]\n\n\n"
            "class Decoder(nn.Module):\n"
            "    def __init__(self, config):\n"
            "        if config.learned:\n            self.embed_positions = Pos(config.n, config.d)\n"
            "        else:\n            self.embed_positions = Sin(config.n, config.d)\n",
            "class Pos(nn.Embedding):\n"
            "    def forward(self, positions: torch.Tensor):\n"
            "        return super().forward(positions + 2)\n\n\n"
            "class Sin(nn.Module):\n"
            "    def forward(self, input_ids, past_key_values_length=0):\n"
            "        return self.weights[input_ids.ne(1).cumsum(1) + past_key_values_length]\n\n\n"
            "class Decoder(nn.Module):\n"
            "    def __init__(self, config):\n"
            "        if config.learned:\n            self.embed_positions = Pos(config.n, config.d)\n"
            "        else:\n            raise ValueError(\"porter: this port does not build Sin (chosen when not "
            "`config.learned`): its forward computes positions the port does not reproduce; the port reads "
            "the engine's positions\")\n",
        ),
        # must leave unchanged: the range does not start at the cache length it is handed
        Example(
            "class Pos(nn.Embedding):\n    def forward(self, input_ids, past_key_values_length=0):\n"
            "        positions = torch.arange(0, input_ids.shape[1])\n"
            "        return super().forward(positions)\n",
            "class Pos(nn.Embedding):\n    def forward(self, input_ids, past_key_values_length=0):\n"
            "        positions = torch.arange(0, input_ids.shape[1])\n"
            "        return super().forward(positions)\n",
        ),
    ]

    @classmethod
    def applies(cls, ctx) -> bool:
        return "arange" in ctx.idx.identifiers

    @staticmethod
    def find(fn: cst.FunctionDef) -> tuple[str, set[str], list[int]] | None:
        return arange_positions(fn)
