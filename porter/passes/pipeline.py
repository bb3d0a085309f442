"""Every rule, in the order it runs, and the one runner (convert, the config port and the example
tests all call `run`).

Three stages, each a list in run order:
- BEFORE_INDEX: rewrites of the parsed source before it is indexed, so the index sees the engine's
  form of the attention (one attention call where HF computes it inline or picks an arm by the
  attention implementation). They keep the source's line numbers.
- MODEL: the rewrite passes over the indexed modeling file, reading the plan. The passes before the
  first one with `reads_target` run once for all targets (convert forks there).
- CONFIG: the rewrites of a shipped configuration module (day-zero ports, porter/config_port.py).
"""

from __future__ import annotations

import libcst as cst

from porter.errors import PorterError
from porter.passes.attention.alibi_arm import AlibiArm
from porter.passes.attention.alibi_by_config import AlibiTestByConfig
from porter.passes.attention.attention_sinks import AttentionSinks
from porter.passes.attention.cache_arm import CacheArm
from porter.passes.attention.drop_cross_attention import DropCrossAttention
from porter.passes.attention.drop_kv_repeat import DropKvRepeat
from porter.passes.attention.drop_uncalled_attention import DropUncalledAttention
from porter.passes.attention.eager_arm import EagerArm
from porter.passes.attention.engine_attention import EngineAttention
from porter.passes.attention.flatten_heads import FlattenHeads
from porter.passes.attention.fold_query_scale import FoldQueryScale
from porter.passes.attention.fuse_qkv import FuseQkv
from porter.passes.attention.inline_absent_input_arm import InlineAbsentInputArm
from porter.passes.attention.inline_eager_attention import InlineEagerAttention
from porter.passes.attention.inline_self_attention_arm import InlineSelfAttentionArm
from porter.passes.attention.kv_sharing import KvSharing
from porter.passes.attention.kv_sharing_attention import KvSharingAttention
from porter.passes.attention.latent_attention import LatentAttention
from porter.passes.attention.latent_decompressed import LatentDecompressed
from porter.passes.attention.latent_indexer_guard import LatentIndexerGuard
from porter.passes.attention.output_attentions_arm import OutputAttentionsArm
from porter.passes.attention.per_head_bias import PerHeadBias
from porter.passes.attention.per_head_scale import PerHeadScale
from porter.passes.attention.prefer_attention_function import PreferAttentionFunction
from porter.passes.attention.resolve_attention_table import ResolveAttentionTable
from porter.passes.attention.scalar_tensor_scale import ScalarTensorScale
from porter.passes.attention.upcast_arm import UpcastArm
from porter.passes.attention.value_from_key import ValueFromKey
from porter.passes.base import REGISTRY, Rule
from porter.passes.cleanup.drop_autocast import DropAutocast
from porter.passes.cleanup.drop_dead_locals import DropDeadLocals
from porter.passes.cleanup.drop_dropout import DropDropout
from porter.passes.cleanup.drop_dropout_modules import DropDropoutModules
from porter.passes.cleanup.drop_hf_imports import DropHfImports
from porter.passes.cleanup.drop_input_checks import DropInputChecks
from porter.passes.cleanup.drop_stale_comments import DropStaleComments
from porter.passes.cleanup.drop_unused_optional_imports import DropUnusedOptionalImports
from porter.passes.cleanup.identity_view import IdentityView
from porter.passes.cleanup.drop_unused_buffers import DropUnusedBuffers
from porter.passes.cleanup.drop_unread_attributes import DropUnreadAttributes
from porter.passes.cleanup.prune_unreachable import PruneUnreachable
from porter.passes.cleanup.replace_base_classes import ReplaceBaseClasses
from porter.passes.cleanup.strip_decorators import StripDecorators
from porter.passes.cleanup.unported_arm import UnportedArm
from porter.passes.config.config_engine_imports import ConfigEngineImports
from porter.passes.config.config_keep_class import ConfigKeepClass
from porter.passes.config.config_layer_count import ConfigLayerCount
from porter.passes.mlp.act_then_mul import ActThenMul
from porter.passes.mlp.activation_table import ActivationTable
from porter.passes.mlp.chunked_act_and_mul import ChunkedActAndMul
from porter.passes.mlp.engine_activation import EngineActivation
from porter.passes.mlp.engine_activation_class import EngineActivationClass
from porter.passes.mlp.fuse_gate_up import FuseGateUp
from porter.passes.moe.checkpoint_module_names import CheckpointModuleNames
from porter.passes.moe.correction_bias import CorrectionBias
from porter.passes.moe.device_fast_path import DeviceFastPath
from porter.passes.moe.flat_tokens import FlatTokens
from porter.passes.moe.fused_moe import FusedMoe
from porter.passes.moe.routing_function import RoutingFunction
from porter.passes.moe.routing_method import RoutingMethod
from porter.passes.norms.engine_norms import EngineNorms
from porter.passes.norms.full_width_qk_norm import FullWidthQkNorm
from porter.passes.norms.fused_add_norm import FusedAddNorm
from porter.passes.norms.norm_across_tp_ranks import NormAcrossTpRanks
from porter.passes.plumbing.arange_positions import ArangePositions
from porter.passes.plumbing.causal_lm_interface import CausalLmInterface
from porter.passes.plumbing.compile_base_model import CompileBaseModel
from porter.passes.plumbing.config_property import ConfigProperty
from porter.passes.plumbing.drop_batch_collapse import DropBatchCollapse
from porter.passes.plumbing.drop_hf_dataflow import DropHfDataflow
from porter.passes.plumbing.drop_pass_through import DropPassThrough
from porter.passes.plumbing.engine_imports import EngineImports
from porter.passes.plumbing.flat_position_lookup import FlatPositionLookup
from porter.passes.plumbing.eagle3_hooks import Eagle3Hooks
from porter.passes.plumbing.lora_interface import LoraInterface
from porter.passes.plumbing.failing_init_arm import FailingInitArm
from porter.passes.plumbing.fix_call_arity import FixCallArity
from porter.passes.plumbing.mask_positions import MaskPositions
from porter.passes.plumbing.match_callee_params import MatchCalleeParams
from porter.passes.plumbing.pipeline_head import PipelineHead
from porter.passes.plumbing.pipeline_stages import PipelineStages
from porter.passes.plumbing.plain_attribute_assign import PlainAttributeAssign
from porter.passes.plumbing.module_list_comprehension import ModuleListComprehension
from porter.passes.plumbing.rename_engine_clashes import RenameEngineClashes
from porter.passes.plumbing.strip_hf_params import StripHfParams
from porter.passes.plumbing.thread_positions import ThreadPositions
from porter.passes.plumbing.thread_prefix import ThreadPrefix
from porter.passes.plumbing.trained_length_guard import TrainedLengthGuard
from porter.passes.plumbing.unwrap_outputs import UnwrapOutputs
from porter.passes.rope.drop_rope_config_reads import DropRopeConfigReads
from porter.passes.rope.engine_rope import EngineRope
from porter.passes.rope.yarn_mscale import YarnMscale
from porter.passes.rope.flat_position_factor import FlatPositionFactor
from porter.passes.rope.one_tensor_rope import OneTensorRope
from porter.passes.rope.partial_rotary import PartialRotary
from porter.passes.rope.per_layer_rope import PerLayerRope
from porter.passes.rope.reversed_rope import ReversedRope
from porter.passes.rope.trained_length_identity import TrainedLengthIdentity
from porter.passes.plumbing.base_class_arm import BaseClassArm
from porter.passes.rope.rope_order import RopeOrder
from porter.passes.ssm.engine_mamba_mixer import EngineMambaMixer
from porter.passes.ssm.engine_short_conv import EngineShortConv
from porter.passes.ssm.mamba_state_interface import MambaStateInterface
from porter.passes.tp.gather_before_norm import GatherBeforeNorm
from porter.passes.tp.one_all_reduce import OneAllReduce
from porter.passes.tp.tp_linears import TpLinears
from porter.passes.tp.vocab_embedding import VocabEmbedding

BEFORE_INDEX: list[type[Rule]] = [
    RenameEngineClashes,  # first: every later rule and the index see the file's classes by their port names
    BaseClassArm,  # before indexing: the index sees the sub-module build of an `__init__` helper in __init__
    FailingInitArm,  # before indexing: the index never sees the sub-modules of an arm the port cannot build
    TrainedLengthIdentity,  # before indexing: the planner reads the rotary call with its length factor the literal 1
    EagerArm,  # first: the `else` arm it keeps may hold the inline attention PT150 replaces
    UpcastArm,  # before PT150: one softmax where HF upcasts in an arm of its own
    OutputAttentionsArm,  # before PT150: no reshaped copy of the weights between softmax and sum
    InlineSelfAttentionArm,  # before PT150: the causal mask of self-attention among the score steps
    InlineAbsentInputArm,  # before PT150: no head-mask product between softmax and weighted sum
    ScalarTensorScale,  # before PT150: a scale it can hand the engine (no 0-d tensor built like the scores)
    CacheArm,  # before indexing: k and v of the arm without HF's tuple cache (the planner finds their projections)
    InlineEagerAttention,
    AlibiArm,  # after PT150: picks the arm of the `attention_interface` call PT150 made
    DeviceFastPath,  # a router's CUDA-only arm: the index reads the reference arm
]

MODEL: list[type[Rule]] = [
    DropHfImports,
    ConfigProperty,  # first: the rules below read `config.X` as the engine's config has it
    ModuleListComprehension,  # early: the rules below read a layer list in its comprehension form
    StripDecorators,
    PlainAttributeAssign,  # early: the rules below read submodule builds as plain assignments
    ReplaceBaseClasses,
    DropCrossAttention,
    DropPassThrough,  # before PT010 strips the HF-only arguments that mark the call
    KvSharing,  # before PT010/PT011: the k/v a forward argument hands over are the engine cache's
    LatentAttention,  # early: the engine's MLA layer replaces the whole attention (its rotary, its call)
    LatentDecompressed,  # ... or ordinary attention over decompressed k/v where the engine has no MLA for the type
    PreferAttentionFunction,
    DropInputChecks,
    ResolveAttentionTable,
    DropAutocast,
    PartialRotary,
    OneTensorRope,  # before EngineRope: takes the one-tensor rotary calls it would otherwise see
    EngineRope,  # before the dataflow pass: it consumes cos/sin and removes the rotary module
    PerLayerRope,  # after EngineRope (its get_rope, built in some layers only), before the dataflow pass
    FoldQueryScale,  # before EngineAttention replaces the call whose `scaling=1.0` it reads
    EngineAttention,
    DropUncalledAttention,  # after EngineAttention, before PT126: the causal buffer only such a method read goes
    AttentionSinks,
    PerHeadBias,  # after EngineAttention: reads what its self.attn(...) returns
    DropKvRepeat,  # after EngineAttention: reads the k and v of the engine call it made
    AlibiTestByConfig,  # before StripHfParams drops the bias parameter its tests read
    MaskPositions,  # before PT010/PT011: the mask and cache length it reads are HF-only to them
    ArangePositions,  # (idem: the input and cache length its positions are built from)
    StripHfParams,
    DropHfDataflow,
    DropDropout,
    DropBatchCollapse,
    PerHeadScale,  # before FlattenHeads: the head split around a per-head product stays
    FlattenHeads,
    FlatTokens,  # after FlattenHeads: what is left of `b, s, h = x.shape` restores a batch
    FlatPositionFactor,  # module helpers the kept forwards call with the (flat) positions
    FlatPositionLookup,  # a position table looked up by (batch, seq) positions (XGLM)
    FusedMoe,
    CorrectionBias,  # after PT100: places the bias the FusedMoE it built reads
    RoutingFunction,  # after PT100: the router it kept routes with its own code
    RoutingMethod,  # after PT100: the block's own routing method it handed FusedMoE
    FuseQkv,
    KvSharingAttention,  # after PT023 (its fused projection) and PT021 (its Attention): where layers read another's k/v
    FuseGateUp,
    ActThenMul,  # after FuseGateUp: splits the act-and-mul it made where the engine has no such kernel
    TpLinears,
    UnportedArm,  # after the fused / parallel linears: an arm reading the weights they replaced
    GatherBeforeNorm,  # after TpLinears: the row-parallel projection it built takes the gathered width
    VocabEmbedding,
    EngineNorms,
    NormAcrossTpRanks,
    # after FuseQkv (works on the split of the fused projection) and after PT120, which takes the
    # norms it recognises (incl. replicated KV heads); this one takes the remaining flat q/k norms
    FullWidthQkNorm,
    EngineActivation,
    ActivationTable,
    EngineActivationClass,
    ChunkedActAndMul,  # after PT025 built the merged projection and PT028/PT143/PT140 the plain activation
    UnwrapOutputs,
    FixCallArity,
    ThreadPositions,
    MatchCalleeParams,
    OneAllReduce,  # after TpLinears (the row-parallel projections) and UnwrapOutputs (what the blocks return)
    FusedAddNorm,  # after PT031/PT032/PT033 settle the layer calls and forwards: it adds `residual` to both
    CheckpointModuleNames,
    ThreadPrefix,
    CausalLmInterface,
    ValueFromKey,  # after CausalLmInterface: hands k's weights on as the v shard in the load filter it wrote
    ReversedRope,  # after CausalLmInterface: folds a sign into the load filter it wrote
    TrainedLengthGuard,  # after CausalLmInterface: into the __init__ it wrote (reads PT300's record)
    RopeOrder,  # (idem: moves q/k rows in that filter)
    EngineMambaMixer,  # reads the target (its config accessor): after the first rule that does
    EngineShortConv,  # (idem)
    LatentIndexerGuard,  # (idem); the statement building an indexer PT281 kept becomes its bound's check
    MambaStateInterface,  # after PT050 built the causal LM it adds to
    IdentityView,  # before PT320: an identity view of the hidden stream would hold a shape across its stages
    PipelineStages,  # after the rules that write the base model's forward, before PT052 reads its arguments
    PipelineHead,  # after PT320 (it acts only where the base model was staged) and the rules writing load_weights
    LoraInterface,  # after PT050 and the rules writing packed_modules_mapping
    Eagle3Hooks,  # after PT320/PT321 (the staged base model and causal LM it hooks)
    CompileBaseModel,
    DropUnusedBuffers,
    DropRopeConfigReads,  # late: once no kept code reads the copy
    YarnMscale,  # a rotary helper of transformers' utilities the port writes itself
    DropDropoutModules,  # late, before PT060 (it removes the helper it inlines) and PT310 (the probabilities it drops)
    DropDeadLocals,  # late: the rules above leave locals nothing reads any more
    PruneUnreachable,  # after every rule that can remove a use of a class or helper
    DropUnreadAttributes,  # after PT060: once no kept code reads what HF's plumbing read (is_causal, padding_idx)
    DropStaleComments,  # after every rule that removes code: the names the port no longer has
    DropUnusedOptionalImports,  # after PT060: the code that read an optional kernel is gone
    EngineImports,  # last: imports exactly the engine symbols the rules above used
]

CONFIG: list[type[Rule]] = [
    ConfigEngineImports,
    ConfigKeepClass,  # after the imports are absolute: drops the imports only dropped classes used
    ConfigLayerCount,
]

STAGES: dict[str, list[type[Rule]]] = {
    "before indexing": BEFORE_INDEX, "model": MODEL, "config module": CONFIG}
PIPELINE: list[type[Rule]] = [r for rules in STAGES.values() for r in rules]

# a registered rule missing from PIPELINE must be named here with the reason (none today)
NOT_IN_PIPELINE: dict[str, str] = {}


def stage_of(rule: type[Rule]) -> str | None:
    """Where a rule runs ("before indexing", "model", "config module"), None when it runs nowhere."""
    return next((name for name, rules in STAGES.items() if rule in rules), None)


def catalogue() -> list[type[Rule]]:
    """Every registered rule: the pipeline in run order, then any registered elsewhere (a plugin's)."""
    return PIPELINE + [r for r in REGISTRY.values() if r not in PIPELINE]


def run(rules: list[type[Rule]], module: cst.Module, ctx, applied: list[str] | None = None,
        path: str | None = None) -> cst.Module:
    """Each rule that applies to `ctx`, in order, over `module`; the rules that changed something
    are appended to `applied` ("PT023 fuse-qkv"). A rule's unexpected failure is a one-line error
    naming the file and the rule."""
    for rule_cls in rules:
        if not rule_cls.applies(ctx):
            continue
        rule = rule_cls(ctx)
        try:
            module = rule.rewrite(module)
        except PorterError:
            raise
        except (ValueError, AttributeError, IndexError, KeyError, TypeError) as exc:
            raise PorterError(
                f"cannot port: {type(exc).__name__}: {exc}", file=path, rule=rule_cls.name
            ) from None
        if rule.changed and applied is not None:
            applied.append(f"{rule_cls.code} {rule_cls.name}")
    return module
