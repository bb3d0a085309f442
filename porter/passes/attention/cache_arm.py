"""PT226 cache-arm: the rule `CacheArm`; its `why` says what it rewrites and why."""

from __future__ import annotations

from porter.analysis.index import CACHE_PARAMS
from porter.passes.attention._absent_arms import AbsentArmRule
from porter.passes.base import Example
from porter.rules_data import strip_table


class CacheArm(AbsentArmRule):
    code = "PT226"
    name = "cache-arm"
    why = (
        "transformers 4.x attentions (OPT, BART-era files) project k and v in the arms of a chain on "
        "their tuple cache: `elif past_key_value is not None:` projects the new tokens and concatenates "
        "the cached ones, `else:` projects the tokens given. The engine's Attention keeps the KV cache "
        "itself and takes the k and v of the tokens it is given, which is what HF's arm without a cache "
        "computes: a test on the cache parameter (rules/hf_strip.yaml strip_params that carry HF's cache) "
        "takes the arm of no cache (`X is not None` false, `X is None` true), `elif` links included, "
        "before indexing, so the planner finds q, k and v coming from their projections. A statement "
        "that re-binds the cache parameter to what HF hands back as its cache (`past_key_value = (k, v)`, "
        "alone or in an `if self.is_decoder:`) goes too: the engine's Attention writes its cache itself. "
        "An `if` on the cache with no `else` (a cache update) is left to PT011, which drops it."
    )
    drops_writes = True
    drops_lone_arms = False
    examples = [
        Example(
            "class Attn(nn.Module):\n    def forward(self, x, kv=None, past_key_value=None):\n"
            "        q = self.q_proj(x)\n"
            "        if kv is not None:\n            k = self.k_proj(kv)\n"
            "        elif past_key_value is not None:\n"
            "            k = torch.cat([past_key_value[0], self.k_proj(x)], dim=2)\n"
            "        else:\n            k = self.k_proj(x)\n"
            "        return nn.functional.softmax(q @ k.transpose(1, 2), dim=-1)\n",
            "class Attn(nn.Module):\n    def forward(self, x, kv=None, past_key_value=None):\n"
            "        q = self.q_proj(x)\n"
            "        if kv is not None:\n            k = self.k_proj(kv)\n"
            "        else:\n            k = self.k_proj(x)\n"
            "        return nn.functional.softmax(q @ k.transpose(1, 2), dim=-1)\n",
        ),
        # must leave unchanged: a cache update with no arm of its own (PT011 drops it)
        Example(
            "class Attn(nn.Module):\n    def forward(self, x, layer_past=None):\n"
            "        k = self.k_proj(x)\n"
            "        if layer_past is not None:\n            k = torch.cat((layer_past[0], k), dim=-2)\n"
            "        return nn.functional.softmax(x @ k.transpose(1, 2), dim=-1)\n",
            "class Attn(nn.Module):\n    def forward(self, x, layer_past=None):\n"
            "        k = self.k_proj(x)\n"
            "        if layer_past is not None:\n            k = torch.cat((layer_past[0], k), dim=-2)\n"
            "        return nn.functional.softmax(x @ k.transpose(1, 2), dim=-1)\n",
        ),
        Example(  # the cache HF hands back (OPT 4.x): the engine's Attention writes its own
            "class Attn(nn.Module):\n    def forward(self, x, past_key_value=None):\n"
            "        k = self.k_proj(x)\n"
            "        if self.is_decoder:\n            past_key_value = (k, k)\n"
            "        return nn.functional.softmax(x @ k.transpose(1, 2), dim=-1), past_key_value\n",
            "class Attn(nn.Module):\n    def forward(self, x, past_key_value=None):\n"
            "        k = self.k_proj(x)\n"
            "        return nn.functional.softmax(x @ k.transpose(1, 2), dim=-1), past_key_value\n",
        ),
    ]

    def absent(self, names: set[str]) -> set[str]:
        return names & CACHE_PARAMS & strip_table().strip_params
