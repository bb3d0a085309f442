"""Phase 3 — the rewrite passes, in the one order they run."""

from porter.passes.attention import EngineAttention, EngineRope, FlattenHeads, FuseQkv, PartialRotary
from porter.passes.base import REGISTRY, Example, RewriteContext, Rule
from porter.passes.causal_lm import CausalLmInterface, EngineImports, PruneUnreachable
from porter.passes.cleanup import DropHfImports, ReplaceBaseClasses, StripDecorators
from porter.passes.hf_dataflow import DropBatchCollapse, DropDeadLocals, DropDropout, DropHfDataflow
from porter.passes.moe import CheckpointModuleNames, FlatTokens, FusedMoe
from porter.passes.layers import EngineActivation, EngineNorms, FuseGateUp, TpLinears, VocabEmbedding
from porter.passes.signatures import StripHfParams
from porter.passes.tp_norm import FullWidthQkNorm
from porter.passes.structure import (
    FixCallArity,
    ThreadPositions,
    MatchCalleeParams,
    ThreadPrefix,
    UnwrapOutputs,
)

PASSES: list[type[Rule]] = [
    DropHfImports,
    StripDecorators,
    ReplaceBaseClasses,
    PartialRotary,
    EngineRope,  # before the dataflow pass: it consumes cos/sin and removes the rotary module
    EngineAttention,
    StripHfParams,
    DropHfDataflow,
    DropDropout,
    DropBatchCollapse,
    FlattenHeads,
    FlatTokens,  # after FlattenHeads: what is left of `b, s, h = x.shape` restores a batch
    FusedMoe,
    FuseQkv,
    FullWidthQkNorm,  # after FuseQkv: works on the split of the fused projection
    FuseGateUp,
    TpLinears,
    VocabEmbedding,
    EngineNorms,
    EngineActivation,
    UnwrapOutputs,
    FixCallArity,
    ThreadPositions,
    MatchCalleeParams,
    CheckpointModuleNames,
    ThreadPrefix,
    CausalLmInterface,
    DropDeadLocals,
    PruneUnreachable,
    EngineImports,
]

__all__ = ["PASSES", "REGISTRY", "Example", "RewriteContext", "Rule"]
