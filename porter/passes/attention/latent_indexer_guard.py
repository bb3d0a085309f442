"""PT282 latent-indexer-guard: the rule `LatentIndexerGuard`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, self_attr
from porter.analysis.latent_around import LatentAround
from porter.passes.base import Example, Rule

_BEFORE = '''
class Attn(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.g_proj = nn.Linear(config.hidden_size, config.num_attention_heads, bias=False)
        self.indexer = Indexer(config, layer_idx) if config.layer_types[layer_idx] == "indexed_attention" else None
'''

_AFTER = '''
class Attn(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.g_proj = nn.Linear(config.hidden_size, config.num_attention_heads, bias=False)
        if config.layer_types[layer_idx] == "indexed_attention" and get_current_vllm_config().model_config.max_model_len > config.index_topk:
            # the indexer's top-k is every key while a sequence has no more than index_topk: it is not built
            raise ValueError(f"this port computes sparse attention (DSA) exactly while a sequence has at most index_topk={config.index_topk} tokens, where its indexer selects every key; max_model_len={get_current_vllm_config().model_config.max_model_len} is above it: set max_model_len <= {config.index_topk}")
'''


class LatentIndexerGuard(Rule):
    code = "PT282"
    reads_target = True  # the engine's current-config accessor is named after the engine
    name = "latent-indexer-guard"
    why = (
        "A sparse-attention indexer beside latent attention (DeepSeek Sparse Attention, dots3_note's "
        "`Dots3NoteTextIndexer`; porter/analysis/latent_around.py) scores the keys and keeps the top "
        "`index_topk` of each query, `min(index_topk, keys)` of them: while a sequence has no more keys "
        "than index_topk the selection is every key and the attention is the dense causal one. The engine "
        "has no sparse attention on the CPU, so the port computes exactly that bound: the indexer is not "
        "built (its checkpoint tensors are skipped when loading) and the statement building it becomes a "
        "check that raises at load, under the same test, when the engine's max_model_len is above the "
        "bound, saying so, instead of a port that would silently attend to every key beyond it."
    )
    examples = [Example(_BEFORE, _AFTER, seed={
        # the example's indexer as porter/analysis/latent_around.py reads it: its top-k bounded by config.index_topk
        "latent_arounds": {"Attn": LatentAround(indexer="indexer", indexer_cls="Indexer", index_topk="config.index_topk")}})]

    @classmethod
    def applies(cls, ctx) -> bool:
        return bool(cls._indexers(ctx))

    @staticmethod
    def _indexers(ctx) -> dict[str, tuple[str, str]]:
        """attention class -> (indexer attribute, its top-k bound)."""
        return {cls: (a.indexer, a.index_topk) for cls, a in ctx.plan.latent_arounds.items() if a.indexer}

    def leave_SimpleStatementLine(self, original, updated):
        found = self._indexers(self.ctx).get(self.current_class or "")
        if found is None or self.current_function != "__init__" or not m.matches(updated, m.SimpleStatementLine(
                body=[m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))])])):
            return updated
        assign = updated.body[0]
        if self_attr(assign.targets[0].target) != found[0]:
            return updated
        bound = found[1]
        value = assign.value
        when = code(value.test) if isinstance(value, cst.IfExp) and m.matches(value.orelse, m.Name("None")) else None
        max_len = f"{self.ctx.use('get_current_engine_config')}().model_config.max_model_len"
        test = f"{when} and {max_len} > {bound}" if when else f"{max_len} > {bound}"
        self.mark()
        return cst.parse_statement(
            f"if {test}:\n"
            "    # the indexer's top-k is every key while a sequence has no more than index_topk: it is not built\n"
            "    raise ValueError(f\"this port computes sparse attention (DSA) exactly while a sequence has at most "
            f"index_topk={{{bound}}} tokens, where its indexer selects every key; max_model_len={{{max_len}}} is "
            f"above it: set max_model_len <= {{{bound}}}\")\n")
