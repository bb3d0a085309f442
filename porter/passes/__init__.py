"""Phase 3 — the rewrite passes, in the one order they run."""

from porter.passes.alibi_arm import AlibiArm, AlibiTestByConfig  # noqa: F401  (PT170 runs before indexing, after PT150)
from porter.passes.autocast import DropAutocast
from porter.passes.buffers import DropUnusedBuffers
from porter.passes.attention import (
    EngineAttention, EngineRope, FlattenHeads, FoldQueryScale, FuseQkv, PartialRotary,
)
from porter.passes.base import REGISTRY, Example, RewriteContext, Rule
from porter.passes.causal_lm import CausalLmInterface, CompileBaseModel, EngineImports, PruneUnreachable
from porter.passes.cross_attention import DropCrossAttention
from porter.passes.inline_attention_arm import PreferAttentionFunction
from porter.passes.inline_attention import EagerArm, InlineEagerAttention  # noqa: F401  (runs before indexing: convert.analyse)
from porter.passes.input_checks import DropInputChecks
from porter.passes.cleanup import DropHfImports, ReplaceBaseClasses, StripDecorators
from porter.passes.hf_dataflow import DropBatchCollapse, DropDeadLocals, DropDropout, DropHfDataflow
from porter.passes.moe import CheckpointModuleNames, FlatTokens, FusedMoe
from porter.passes.position_factor import FlatPositionFactor
from porter.passes.layers import EngineActivation, EngineActivationClass, EngineNorms, FuseGateUp, TpLinears, VocabEmbedding
from porter.passes.signatures import StripHfParams
from porter.passes.sinusoidal_rope import OneTensorRope
from porter.passes.sinks import AttentionSinks
from porter.passes.tables import ResolveAttentionTable
from porter.passes.tp_norm import FullWidthQkNorm
from porter.passes.tp_norms import NormAcrossTpRanks
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
    DropCrossAttention,
    PreferAttentionFunction,
    DropInputChecks,
    ResolveAttentionTable,
    DropAutocast,
    PartialRotary,
    OneTensorRope,  # before EngineRope: takes the one-tensor rotary calls it would otherwise see
    EngineRope,  # before the dataflow pass: it consumes cos/sin and removes the rotary module
    FoldQueryScale,  # before EngineAttention replaces the call whose `scaling=1.0` it reads
    EngineAttention,
    AttentionSinks,
    AlibiTestByConfig,  # before StripHfParams drops the bias parameter its tests read
    StripHfParams,
    DropHfDataflow,
    DropDropout,
    DropBatchCollapse,
    FlattenHeads,
    FlatTokens,  # after FlattenHeads: what is left of `b, s, h = x.shape` restores a batch
    FlatPositionFactor,  # module helpers the kept forwards call with the (flat) positions
    FusedMoe,
    FuseQkv,
    FuseGateUp,
    TpLinears,
    VocabEmbedding,
    EngineNorms,
    NormAcrossTpRanks,
    # after FuseQkv (works on the split of the fused projection) and after PT120, which takes the
    # norms it recognises (incl. replicated KV heads); this one takes the remaining flat q/k norms
    FullWidthQkNorm,
    EngineActivation,
    EngineActivationClass,
    UnwrapOutputs,
    FixCallArity,
    ThreadPositions,
    MatchCalleeParams,
    CheckpointModuleNames,
    ThreadPrefix,
    CausalLmInterface,
    CompileBaseModel,
    DropUnusedBuffers,
    DropDeadLocals,
    PruneUnreachable,
    EngineImports,
]

__all__ = ["PASSES", "REGISTRY", "Example", "RewriteContext", "Rule"]

# the rules over a shipped configuration module register themselves on import
import porter.config_port  # noqa: E402,F401
