"""The plan's data: what the port is, decided once by the planner (porter/plan/planner.py).

The plan is the single input of the rewrite passes and of the templates, so the generated model
code and its `load_weights` can never disagree about fusions or names. The planner finishes it
and seals it: from then on, setting a field raises, and its lists and dicts are read-only
(`seal`). Passes import these types only.

Fields marked `derived` are facts the passes read (computed from the index and the plan once, by
the planner) but that are not part of the port's record: `to_dict` (PORT.json, `porter plan`)
leaves them out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from porter.analysis.latent_around import LatentAround
from porter.analysis.latent_attention import LatentAttention
from porter.analysis.moe import MoePlan, compact_moe
from porter.analysis.ssm import SsmPlan
from porter.rules_data import StripTable

if TYPE_CHECKING:
    from porter.analysis.index import ClassInfo, ModelIndex

_DERIVED = {"derived": True}


class PlanningContext(Protocol):
    """What a refusal check (porter/plan/refusals.py) reads from the planner that calls it."""

    idx: ModelIndex
    table: StripTable
    model_type: str

    def reachable(self, root: ClassInfo, stop: frozenset[str] = ...) -> list[str]: ...

    def attention_call_names(self) -> set[str]: ...


class FrozenDict(dict):
    """A dict of a sealed plan: reading as a dict, any change raises."""

    def _readonly(self, *args, **kw):
        raise TypeError("the plan is sealed: its tables are read-only")

    __setitem__ = __delitem__ = update = setdefault = pop = popitem = clear = _readonly  # type: ignore[assignment]

    def __reduce__(self):
        return (FrozenDict, (dict(self),))


class Sealable:
    """A dataclass whose fields can no longer be set once `seal` has run on it."""

    def __setattr__(self, name: str, value) -> None:
        if self.__dict__.get("_sealed"):
            raise dataclasses.FrozenInstanceError(f"the plan is sealed: cannot set {type(self).__name__}.{name}")
        object.__setattr__(self, name, value)


def _frozen(value):
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict) and not isinstance(value, FrozenDict):
        return FrozenDict((k, _frozen(v)) for k, v in value.items())
    if dataclasses.is_dataclass(value) and isinstance(value, (Sealable, MoePlan)):
        return seal(value)
    return value


def seal(obj):
    """OBJ and every plan dataclass inside it made read-only: lists become tuples, dicts
    `FrozenDict`s, and setting a field raises. Returns OBJ."""
    for f in dataclasses.fields(obj):
        object.__setattr__(obj, f.name, _frozen(getattr(obj, f.name)))
    if isinstance(obj, MoePlan):  # (defined in porter/analysis/moe.py, below the plan)
        return obj
    object.__setattr__(obj, "_sealed", True)
    return obj


@dataclass(frozen=True)
class HeadSpanningNorm:
    """A norm sub-module of an attention whose parameters span its heads (q/k norms over all heads)."""

    attr: str
    kv: bool  # normalises k (else q)
    per_head: bool  # one weight per head (else one norm over the whole projection width)


@dataclass
class LinearPlan(Sealable):
    cls: str
    attr: str
    role: str  # column | row | replicated | lm_head
    line: int


@dataclass
class AttentionPlan(Sealable):
    cls: str
    q: str
    k: str
    v: str
    o: str | None
    head_dim: str
    num_heads: str
    num_kv_heads: str
    hidden_size: str
    bias: str
    scale: str
    sliding_window: str | None
    softcap: str | None
    rope: str | None  # None | "neox" | "gptj"
    rope_helper: str | None  # name of the HF function applying rotary
    line: int
    packed: bool = False  # one projection whose output HF slices into q, k, v (fused in the checkpoint)
    interleaved: bool = False  # packed per head ([h0: q k v, h1: q k v, ...]): permuted when loading
    # packed per head only when this attention attribute is false at run time (GPTBigCode: the
    # `if self.multi_query:` arm slices [q; k; v] by sizes, the other arm views per head)
    interleaved_unless: str | None = None
    # packed grouped per KV head ([kv_heads, q_per_kv + 2, head_dim], Falcon's `_split_heads` arms):
    # regrouped into [q; k; v] when loading
    grouped: bool = False
    # packed in blocks ([blocks, 3, heads / blocks * head_dim], CodeGen's mp_num): (blocks, slot of
    # q, of k, of v), regrouped into [q; k; v] when loading (porter/analysis/blocked_qkv.py)
    blocked: tuple[int, int, int, int] | None = None
    alibi: str | None = None  # forward parameter carrying an ALiBi bias (PT150 `alibi=`): slopes in the engine's Attention
    alibi_scale: str | None = None  # the scale HF applies to scores and bias together (after the bias is added)
    # the config test under which the model builds the bias (`if self.use_alibi: alibi = build(...)`,
    # `self.use_alibi = config.alibi`): None when it always does
    alibi_when: str | None = None
    rope_theta: str | None = None  # rotary from a sinusoidal table built in the source (GPT-J): its base
    rope_dim: str | None = None  # ... and how many dims of each head it rotates
    # attention sinks: the `s_aux=` of the HF call (one learned logit per head, the engine's
    # Attention(sinks=...)); PT160 shards the parameter per TP rank
    sinks: str | None = None
    # rotary in some layers only (PT240): the test of `config` and `layer_idx` true for those, their
    # rope_parameters, and "Model.attr", the model's per-base rotary modules (removed)
    rope_when: str | None = None
    rope_params: str | None = None
    rope_tables: str | None = None
    # KV sharing (PT291, porter/analysis/kv_sharing.py): in the layers where `kv_shared_when` holds, k/v
    # are the ones an earlier layer stored under the same key (`kv_read_key` / `kv_write_key`, stored
    # where `kv_write_when` holds): the engine's Attention reads that layer's cache
    kv_shared_when: str | None = None
    kv_read_key: str | None = None
    kv_write_when: str | None = None
    kv_write_key: str | None = None
    kv_param: str | None = None  # the forward parameter that hands the k/v over (HF-only in a port)
    # v is k's projection (no v projection built) where this test of the layer holds (PT292)
    v_from_k: str | None = None
    rope_reversed: bool = False  # rotates by -theta (PT241: the second half of each q/k head negated when loading)
    # the rotary table is the standard one in another order (PT244): statements of `config` and
    # `layer_idx` that compute that order (`order`), replayed in the attention, rows moved when loading
    rope_order: str | None = None


@dataclass
class GateUpPlan(Sealable):
    cls: str
    gate: str
    up: str
    act: str  # attribute holding the activation
    line: int
    unfused: bool = False  # the config's activation has no act-and-mul kernel in the engine (PT243)


@dataclass
class PortPlan(Sealable):
    model_type: str
    source: str
    causal_lm: str
    architecture: str
    base_attr: str  # causal LM attribute holding the base model ("model")
    embed_path: str  # dotted path from the causal LM to the token embedding
    lm_head: str | None
    tie_condition: str
    classes: list[str]  # file classes kept in the port, in file order
    top_classes: list[str]  # classes built directly by the causal LM (take the engine config)
    norms: dict[str, str] = field(default_factory=dict)  # HF norm class -> RMSNorm | GemmaRMSNorm
    rotary_classes: list[str] = field(default_factory=list)
    attentions: list[AttentionPlan] = field(default_factory=list)
    gate_ups: list[GateUpPlan] = field(default_factory=list)
    linears: list[LinearPlan] = field(default_factory=list)
    vocab_embeddings: list[str] = field(default_factory=list)  # "Cls.attr"
    vocab_embedding_classes: list[str] = field(default_factory=list)  # file classes deriving nn.Embedding
    stacked_params: list[tuple[str, str, str]] = field(default_factory=list)  # (fused, orig, shard)
    checkpoint_renames: list[tuple[str, str]] = field(default_factory=list)  # (regex, replacement)
    # attributes holding a linear in the transposed convention (Conv1D): weights transposed when loading
    transposed_linears: list[str] = field(default_factory=list)
    # "Cls.attr": modules only a cross-attention arm calls (TrOCR's `encoder_attn`, built when
    # `config.is_decoder`): not built in the port; their checkpoint tensors are skipped when loading
    cross_attention_modules: list[str] = field(default_factory=list)
    moes: list[MoePlan] = field(default_factory=list)  # router + experts blocks (porter/analysis/moe.py)
    module_renames: dict[str, str] = field(default_factory=dict)  # in-memory attr -> checkpoint attr
    ssm: list[SsmPlan] = field(default_factory=list)  # state-space mixers built as the engine's layer (porter/analysis/ssm.py)
    # (class, norm, row-parallel linear): a norm over a width TP splits, gathered before it (PT242)
    gathered_norms: list[tuple[str, str, str]] = field(default_factory=list)
    # multi-head latent attentions built as the engine's MLA layer (porter/analysis/latent_attention.py)
    latent_attentions: list[LatentAttention] = field(default_factory=list)
    # latent attention class -> what the decompressed port computes around it (porter/analysis/latent_around.py)
    latent_arounds: dict[str, LatentAround] = field(default_factory=dict)
    # the head's rows are normalised to unit length before the logits (porter/analysis/normalized_head.py)
    lm_head_normalized: bool = False
    # -- derived (not in PORT.json) -------------------------------------------------------------
    # the strip table the passes use: rules/hf_strip.yaml, widened by what this model makes
    # HF-only (an ALiBi bias the engine's Attention adds itself, and the callables building it)
    strip: StripTable | None = field(default=None, metadata=_DERIVED)
    # attention class -> its norms spanning the heads (PT120, PT022)
    head_norms: dict[str, dict[str, HeadSpanningNorm]] = field(default_factory=dict, metadata=_DERIVED)
    # class -> methods that only change the layout of their first argument (PT022)
    layout_helpers: dict[str, frozenset[str]] = field(default_factory=dict, metadata=_DERIVED)
    # module functions shaping a per-position factor for HF's layout, called with the positions (PT180)
    position_factors: frozenset[str] = field(default=frozenset(), metadata=_DERIVED)
    # attention class -> (its ALiBi bias parameter, the config test the model builds the bias under) (PT171)
    alibi_tests: dict[str, tuple[str, str]] = field(default_factory=dict, metadata=_DERIVED)
    # config fields an `ACT2FN[config.X]` reads whose default the engine has no act-and-mul kernel for (PT331)
    unfusable_activations: frozenset[str] = field(default=frozenset(), metadata=_DERIVED)

    def moe(self, cls: str) -> MoePlan | None:
        return next((p for p in self.moes if p.cls == cls), None)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.metadata.get("derived"):
                del d[f.name]
        for key in ("moes", "module_renames", "transposed_linears", "cross_attention_modules", "ssm", "gathered_norms", "latent_attentions", "latent_arounds"):  # only where there are any (other ports' PORT.json unchanged)
            if not d[key]:
                del d[key]
        if not d["lm_head_normalized"]:  # (only where the head normalises: other ports' PORT.json unchanged)
            del d["lm_head_normalized"]
        for s in d.get("ssm", []):
            if s["dt_limit"] is None:  # (short convolutions: none; their PORT.json unchanged)
                del s["dt_limit"]
        for a in d["attentions"]:
            for key in ("alibi", "alibi_scale", "alibi_when", "rope_theta", "rope_dim", "rope_when", "rope_params",
                        "rope_tables", "blocked", "rope_order", "kv_shared_when", "kv_read_key",
                        "kv_write_when", "kv_write_key", "kv_param", "v_from_k"):
                if a[key] is None:
                    del a[key]
            for key in ("grouped", "rope_reversed"):
                if not a[key]:
                    del a[key]
        for att in d["attentions"]:  # (idem: only where there are sinks)
            if att.get("sinks") is None:
                att.pop("sinks", None)
        for g in d["gate_ups"]:  # (idem: only where the activation is not fused with the multiply)
            if not g["unfused"]:
                del g["unfused"]
        for moe in d.get("moes", []):  # the scoring only when it is not the default softmax (idem)
            if moe.get("scoring_func") == "softmax":
                del moe["scoring_func"]
            if not moe.get("transposed"):  # (idem: only where the experts are stored transposed)
                moe.pop("transposed", None)
            compact_moe(moe)
        return d

    def attention(self, cls: str) -> AttentionPlan | None:
        return next((a for a in self.attentions if a.cls == cls), None)

    def latent_attention(self, cls: str) -> LatentAttention | None:
        return next((a for a in self.latent_attentions if a.cls == cls), None)

    def gate_up(self, cls: str) -> GateUpPlan | None:
        return next((g for g in self.gate_ups if g.cls == cls), None)

    def linear_role(self, cls: str, attr: str) -> str | None:
        for lp in self.linears:
            if lp.cls == cls and lp.attr == attr:
                return lp.role
        return None

