"""What the planner refuses to port, and why: each refusal once, with a bad input that triggers it.

A `Refusal` is the reason porter gives (one line, with file:line, the construct and the rule that
cannot port it) and an `example`: the smallest file that gets it. tests/test_refusals.py plans
every example and checks the line it fails with (`says`). The checks that find a refusal are the
functions below; the planner calls them where the construct is met (porter/plan/planner.py,
porter/plan/attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, dotted, findall, param_names, self_attr
from porter.analysis.dataflow import ATTN
from porter.analysis.expert_route_norm import route_norm_note
from porter.analysis.index import CACHE_PARAMS, LINEAR_NAMES, ClassInfo, table_class
from porter.analysis.layouts import engine_has_activation_class
from porter.analysis.moe import MoePlan, flat_expert_views, unported_experts
from porter.analysis.ssm import dt_limit_note, engine_layer_note, mamba1_note, recurrent_blocker
from porter.errors import PorterError

if TYPE_CHECKING:
    from porter.plan.model import PlanningContext as Planner, PortPlan


REFUSALS: list[Refusal] = []


@dataclass(frozen=True)
class Refusal:
    reason: str  # the message (a format string where it names what it found)
    example: str  # a bad input that gets this refusal
    says: str  # the one line the example fails with
    rule: str | None = None  # the rule that cannot port the construct
    whole_file: bool = False  # the example is planned as a file (else as a snippet: every class kept)

    def __post_init__(self) -> None:
        REFUSALS.append(self)

    def error(self, p: Planner, node: cst.CSTNode | None, construct: str, **fmt) -> PorterError:
        return p.idx.error(self.reason.format(**fmt) if fmt else self.reason, node,
                           construct=construct, **({"rule": self.rule} if self.rule else {}))


_ATTN_HEAD = "import torch\nfrom torch import nn\n\n\n"

# -- the file as a whole ----------------------------------------------------------------------------

NO_CAUSAL_LM = Refusal(
    "no *ForCausalLM class: nothing to port",
    "class Model:\n    pass\n",
    "<example>: no *ForCausalLM class: nothing to port in module",
    whole_file=True,
)

TWO_CAUSAL_LMS = Refusal(
    "more than one causal-LM class ({names}): cannot tell which to port",
    "class AForCausalLM:\n    pass\n\n\nclass BForCausalLM:\n    pass\n",
    "<example>:5: more than one causal-LM class (AForCausalLM, BForCausalLM): cannot tell which to port "
    "in class BForCausalLM",
    whole_file=True,
)

NO_BASE_MODEL = Refusal(
    "causal LM builds no base model",
    _ATTN_HEAD + "class AForCausalLM(nn.Module):\n    def __init__(self, config):\n"
    "        self.lm_head = nn.Linear(8, 8)\n",
    "<example>:5: causal LM builds no base model in class AForCausalLM",
    whole_file=True,
)

NO_EMBEDDING = Refusal(
    "no token embedding (nn.Embedding of config.vocab_size) found",
    _ATTN_HEAD + "class AModel(nn.Module):\n    def __init__(self, config):\n        self.norm = nn.LayerNorm(8)\n\n\n"
    "class AForCausalLM(nn.Module):\n    def __init__(self, config):\n        self.model = AModel(config)\n",
    "<example>:10: no token embedding (nn.Embedding of config.vocab_size) found in class AForCausalLM",
    whole_file=True,
)

TABLE_CHOSEN_CLASS = Refusal(
    "sub-module class chosen at run time from a table: cannot tell what to port",
    _ATTN_HEAD + "class Layer(nn.Module):\n    def __init__(self, config):\n"
    "        self.mixer = MIXERS[config.mixer](config)\n",
    "<example>:7: sub-module class chosen at run time from a table: cannot tell what to port in "
    "Layer.__init__: MIXERS[config.mixer]",
)


def table_chosen_classes(p: Planner, classes: list[str]) -> None:
    for name in classes:
        init = p.idx.classes[name].method("__init__")
        for node in findall(init, m.Assign(value=m.Call(func=m.Subscript()))) if init else []:
            func = node.value.func  # type: ignore[attr-defined]
            if self_attr(node.targets[0].target) and not table_class(p.idx, func) and not engine_has_activation_class(func):  # type: ignore[attr-defined]
                raise TABLE_CHOSEN_CLASS.error(p, node, f"{name}.__init__: {code(func)}")


RECURRENT_STATE = Refusal(
    "recurrent state carried from one step to the next (the model is `_is_stateful`: Mamba / RNN / "
    "linear-attention layers keep a per-sequence state in HF's cache object); the port keeps no "
    "state between the engine's steps and no rule maps it to the engine's state cache{note}",
    "class AForCausalLM:\n    _is_stateful = True\n",
    "<example>:2: recurrent state carried from one step to the next (the model is `_is_stateful`: Mamba / "
    "RNN / linear-attention layers keep a per-sequence state in HF's cache object); the port keeps no "
    "state between the engine's steps and no rule maps it to the engine's state cache in class "
    "AForCausalLM: _is_stateful = True",
    whole_file=True,
)


def _stateful_flag(p: Planner, info: ClassInfo, seen: frozenset[str] = frozenset()) -> tuple[ClassInfo, cst.CSTNode] | None:
    """`_is_stateful = True` in the body of INFO or of a base of it in this file (HF's
    PreTrainedModel flag for a model that carries a recurrent state across generation steps)."""
    flag = m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name("_is_stateful"))],
                                                value=m.Name("True"))])
    for st in info.node.body.body:
        if m.matches(st, flag):
            return info, st
    for b in info.bases:
        if b in p.idx.classes and b not in seen:
            if (found := _stateful_flag(p, p.idx.classes[b], seen | {info.name})) is not None:
                return found
    return None


def recurrent_state(p: Planner, lm: ClassInfo, classes: list[str], mapped: bool = False) -> None:
    """A causal LM whose model is `_is_stateful` (Mamba / RNN / linear-attention layers: jamba,
    zamba2, xlstm, mamba, ...) keeps a per-sequence state from one step to the next in HF's
    cache object. The port keeps only the engine's KV cache: those layers would restart from
    nothing at every decode step (and run over all of a batch's sequences as one), so the
    port stops here. Names the first method threading the state (`cache_params`), else the flag;
    says so where the layer is a Mamba-1 scan, which the engine cannot run on this CPU. MAPPED: the
    file's Mamba-2 mixers are the engine's MambaMixer2 (porter/analysis/ssm.py); then only a kept
    class (of CLASSES) that still reads the state stops it."""
    if p.idx.identifiers and "_is_stateful" not in p.idx.identifiers:
        return
    found = _stateful_flag(p, lm)
    if found is None:
        return
    if mapped:
        if (blocker := recurrent_blocker(p.idx, classes)) is not None:
            raise blocker
        return
    holder, node = found
    construct = f"class {holder.name}: _is_stateful = True"
    for info in p.idx.classes.values():  # file order
        fn = next((f for f in info.node.body.body if isinstance(f, cst.FunctionDef)
                   and "cache_params" in param_names(f)), None)
        if fn is not None:
            node, construct = fn, f"{info.name}.{fn.name.value}(cache_params)"
            break
    note = mamba1_note(p.idx, list(p.idx.classes)) or dt_limit_note(p.idx, list(p.idx.classes)) \
        or engine_layer_note(p.table, p.model_type)
    raise RECURRENT_STATE.error(p, node, construct, note=note)


STRAY_EXPERTS = Refusal(
    "cannot port mixture of experts: per-expert weights without a router the engine's "
    "FusedMoE reproduces (logits from one projection, then the engine's routing or the router's own code "
    "returning only the indices and weights the experts read) or experts it computes (ACT2FN(gate) * up "
    "of one chunked gate/up weight)",
    _ATTN_HEAD + "class Experts(nn.Module):\n    def __init__(self, config):\n"
    "        self.gate_up = nn.Parameter(torch.empty(4, 16, 8))\n        self.down = nn.Parameter(torch.empty(4, 8, 8))\n\n"
    "    def forward(self, x, idx, w):\n        out = torch.zeros_like(x)\n        out.index_add_(0, idx, x)\n"
    "        return out\n",
    "<example>:5: cannot port mixture of experts: per-expert weights without a router the engine's FusedMoE "
    "reproduces (logits from one projection, then the engine's routing or the router's own code returning only "
    "the indices and weights the experts read) or experts it computes (ACT2FN(gate) * up of one chunked gate/up "
    "weight) in class Experts (rule fused-moe)",
    rule="fused-moe",
)


FLAT_EXPERTS = Refusal(
    "cannot port mixture of experts: per-expert weights held flat, (experts * ffn, hidden), and read one "
    "expert at a time by `.view(...)[e]` in a loop, outside a block porter maps onto FusedMoE (a router "
    "returning logits, the block's routing method, experts computing act(x @ g.T) * (x @ u.T) @ d): kept as "
    "the loop, the port crashes the engine",
    _ATTN_HEAD + "class Experts(nn.Module):\n    def forward(self, x, idx):\n        out = torch.zeros_like(x)\n"
    "        for e in idx:\n            w1 = self.mlp.w1.view(-1, 8, 8)[e]\n"
    "            w2 = self.mlp.w2.view(-1, 8, 8)[e]\n            out.index_add_(0, idx, x @ w1 @ w2)\n"
    "        return out\n",
    "<example>:5: cannot port mixture of experts: per-expert weights held flat, (experts * ffn, hidden), and "
    "read one expert at a time by `.view(...)[e]` in a loop, outside a block porter maps onto FusedMoE (a "
    "router returning logits, the block's routing method, experts computing act(x @ g.T) * (x @ u.T) @ d): "
    "kept as the loop, the port crashes the engine in class Experts (rule fused-moe)",
    rule="fused-moe",
)


def stray_experts(p: Planner, classes: list[str], moes: list[MoePlan]) -> None:
    if (stray := unported_experts(p.idx, classes, moes)) is not None:
        refusal = FLAT_EXPERTS if flat_expert_views(stray) else STRAY_EXPERTS
        raise refusal.error(p, stray.node, f"class {stray.name}{route_norm_note(p.idx, stray) or ''}")


# -- rotary -----------------------------------------------------------------------------------------

REARRANGED_ROPE = Refusal(
    "rotary whose frequency table is rearranged in place: the engine's get_rope builds "
    "the standard table from rope_parameters",
    _ATTN_HEAD + "class Rotary(nn.Module):\n    def __init__(self, config):\n"
    "        inv_freq = 1.0 / (10000 ** torch.arange(0, 8, 2))\n        inv_freq[:2] = inv_freq[2:]\n\n"
    "    def forward(self, x):\n        return x\n",
    "<example>:8: rotary whose frequency table is rearranged in place: the engine's get_rope builds the "
    "standard table from rope_parameters in class Rotary: inv_freq[:2] = ... (rule engine-rope)",
    rule="engine-rope",
)


def rearranged_rope(p: Planner, plan: PortPlan) -> None:
    """A rotary module that writes into part of its frequency table (`inv_freq_3d[:hw_dim] =
    torch.cat([inv_freq[0::2], inv_freq[1::2]])`: CohereCompass's pre-rotated M-RoPE): the port
    drops the module for the engine's get_rope, which builds the standard table from
    rope_parameters, so rotated channels would turn at other speeds."""
    for name in plan.rotary_classes:
        info = p.idx.classes[name]
        # a slice of a tensor (`t[:n] = ...`), not a dict entry (`self.rope_type[layer_type] = ...`)
        sliced = m.Subscript(slice=[m.ZeroOrMore(), m.SubscriptElement(slice=m.Slice()), m.ZeroOrMore()])
        for node in findall(info.node, m.Assign(targets=[m.AssignTarget(target=sliced)])):
            if plan.attentions and all(a.rope_order for a in plan.attentions if a.rope):
                break  # the standard table in another order: PT244 moves q/k rows when loading
            target = node.targets[0].target  # type: ignore[attr-defined]
            raise REARRANGED_ROPE.error(p, node, f"class {name}: {code(target)} = ...")


_ATTN = _ATTN_HEAD + (
    "class Attn(nn.Module):\n    def __init__(self, config):\n        self.head_dim = 8\n"
    "        self.q_proj = nn.Linear(32, 32)\n        self.k_proj = nn.Linear(32, 32)\n"
    "        self.v_proj = nn.Linear(32, 32)\n        self.o_proj = nn.Linear(32, 32)\n{init}\n"
    "    def forward(self, x, cos, sin, past_key_values=None):\n"
    "        q = self.q_proj(x)\n        k = self.k_proj(x)\n        v = self.v_proj(x)\n{forward}"
    "        out, _ = attention_interface(self, q, k, v, None)\n        return self.o_proj(out)\n"
)


def attention_example(init: str = "", forward: str = "", functions: str = "") -> str:
    """A small attention with q/k/v/o projections, with lines added to its __init__ and forward."""
    return _ATTN.format(init=init, forward=forward) + functions


ROTARY_PER_TENSOR = Refusal(  # how: the helper's (or a complex product: pairs times a complex table)
    "rotary applied one tensor per call ({how}): no rule maps it to the engine's get_rope",
    attention_example(forward="        q = apply_rotary(q, sin)\n",
          functions="\n\ndef apply_rotary(x, sin):\n    return x * sin\n"),
    "<example>:17: rotary applied one tensor per call (q and k rotated separately, cos/sin from a sinusoidal "
    "buffer): no rule maps it to the engine's get_rope in Attn.forward: apply_rotary (rule engine-rope)",
    rule="engine-rope",
)

ROTARY_UNDER_HF_TEST = Refusal(
    "rotary applied only under a test of HF-only plumbing (the model hands its NoPE layers "
    "no cos/sin): the loop over the layers does not choose their tables by config as PT240 "
    "reads it, and dropping the test drops the rotary from every layer",
    attention_example(forward="        if past_key_values is not None:\n            q, k = apply_rotary_pos_emb(q, k, cos, sin)\n",
          functions="\n\ndef apply_rotary_pos_emb(q, k, cos, sin):\n    return q * cos, k * sin\n"),
    "<example>:17: rotary applied only under a test of HF-only plumbing (the model hands its NoPE layers no "
    "cos/sin): the loop over the layers does not choose their tables by config as PT240 reads it, and dropping "
    "the test drops the rotary from every layer in Attn.forward: if past_key_values is not None (rule engine-rope)",
    rule="engine-rope",
)

ROTARY_OTHER_WAY = Refusal(
    "rotary that turns the other way (rotate_half returns cat(x2, -x1); the engine's get_rope "
    "rotates cat(-x2, x1)), and q/k pass through more than RMS norms to the attention: a sign "
    "folded into their projections (PT241) would not cancel",
    attention_example(forward="        q, k = apply_rotary_pos_emb(q, k, cos, sin)\n        q = q.flip(-1)\n",
          functions="\n\ndef rotate_half(x):\n    x1, x2 = x.chunk(2, dim=-1)\n    return torch.cat((x2, -x1), dim=-1)\n"
                    "\n\ndef apply_rotary_pos_emb(q, k, cos, sin):\n"
                    "    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin\n"),
    "<example>:25: rotary that turns the other way (rotate_half returns cat(x2, -x1); the engine's get_rope "
    "rotates cat(-x2, x1)), and q/k pass through more than RMS norms to the attention: a sign folded into "
    "their projections (PT241) would not cancel in rotate_half: torch.cat((x2, -x1), dim=-1) (rule engine-rope)",
    rule="engine-rope",
)

ROTARY_WITHOUT_CONFIG = Refusal(
    "rotary attention without a config argument",
    attention_example(forward="        q, k = apply_rotary_pos_emb(q, k, cos, sin)\n",
          functions="\n\ndef apply_rotary_pos_emb(q, k, cos, sin):\n    return q * cos, k * sin\n"
          ).replace("def __init__(self, config):", "def __init__(self, hidden):"),
    "<example>:5: rotary attention without a config argument in class Attn (rule engine-rope)",
    rule="engine-rope",
)

# -- attention --------------------------------------------------------------------------------------

QKV_NOT_FOUND = Refusal(
    "cannot port attention: q/k/v projections not found",
    attention_example().replace("        v = self.v_proj(x)\n", "        v = x\n"),
    "<example>:17: cannot port attention: q/k/v projections not found in Attn.forward (rule fuse-qkv)",
    rule="fuse-qkv",
)

PACKED_NOT_SLICED = Refusal(
    "cannot port attention: one q/k/v projection, but its output "
    "is not sliced into q, k, v by head counts",
    attention_example().replace("        q = self.q_proj(x)\n        k = self.k_proj(x)\n        v = self.v_proj(x)\n",
                    "        qkv = self.q_proj(x)\n        q, k, v = torch.tensor_split(qkv, 3, dim=-1)\n"),
    "<example>:16: cannot port attention: one q/k/v projection, but its output is not sliced into q, k, v by "
    "head counts in Attn.forward (rule fuse-qkv)",
    rule="fuse-qkv",
)

NOT_THREE_PROJECTIONS = Refusal(
    "cannot port attention: q/k/v are not three projections",
    attention_example().replace("        v = self.v_proj(x)\n", "        v = self.k_proj(x)\n"),
    "<example>:17: cannot port attention: q/k/v are not three projections in Attn.forward (rule fuse-qkv)",
    rule="fuse-qkv",
)

NO_HEAD_SIZE = Refusal(
    "attention has no per-head size (self.head_dim / self.head_size)",
    attention_example().replace("        self.head_dim = 8\n", ""),
    "<example>:5: attention has no per-head size (self.head_dim / self.head_size) in class Attn (rule fuse-qkv)",
    rule="fuse-qkv",
)

REUSED_ATTENTION = Refusal(
    "one attention module, several KV-cache slots (its cache index is computed: the module runs "
    "more than once per token); the engine's Attention keeps one KV cache per module, and "
    "each run would overwrite the others'",
    attention_example(init="        self.layer_idx = 0\n",
          forward="        past_key_values.update(k, v, self.layer_idx + 1)\n"),
    "<example>:18: one attention module, several KV-cache slots (its cache index is computed: the module runs "
    "more than once per token); the engine's Attention keeps one KV cache per module, and each run would "
    "overwrite the others' in Attn.forward: past_key_values.update(k, v, self.layer_idx + 1) "
    "(rule engine-attention)",
    rule="engine-attention",
)


def reused_attention(p: Planner, info: ClassInfo, fwd: cst.FunctionDef) -> None:
    """`past_key_values.update(k, v, self.layer_idx + cycle_offset)` (HRM-text): the cache slot
    is computed, one attention module runs several times per token (a recurrence over the same
    stack) and writes a slot for each run. The engine's Attention owns one KV cache per module,
    so every run after the first would overwrite the cache the others read at decode time."""
    for call in findall(fwd, m.Call(func=m.Attribute(attr=m.Name("update")))):
        pos = [a.value for a in call.args if a.keyword is None]  # type: ignore[attr-defined]
        slot = pos[2] if len(pos) >= 3 else next(
            (a.value for a in call.args if a.keyword is not None and a.keyword.value == "layer_idx"), None)  # type: ignore[attr-defined]
        if isinstance(slot, cst.BinaryOperation):
            raise REUSED_ATTENTION.error(p, call, f"{info.name}.forward: {code(call)}")


SHARED_KV = Refusal(
    "keys and values taken from another layer (KV sharing: the layer reads the k/v a forward "
    "argument hands it instead of projecting its own), but no `if` of forward stores them into it "
    "(`arg[key] = k, v`): PT291 cannot tell whose cache the engine's Attention reads",
    attention_example().replace("past_key_values=None)", "past_key_values=None, shared_kv=None)").replace(
        "        k = self.k_proj(x)\n        v = self.v_proj(x)\n",
        "        if self.shared:\n            k, v = shared_kv[0]\n"
        "        else:\n            k = self.k_proj(x)\n            v = self.v_proj(x)\n"),
    "<example>:16: keys and values taken from another layer (KV sharing: the layer reads the k/v a forward "
    "argument hands it instead of projecting its own), but no `if` of forward stores them into it "
    "(`arg[key] = k, v`): PT291 cannot tell whose cache the engine's Attention reads in Attn.forward: "
    "k, v = shared_kv[0] (rule kv-sharing)",
    rule="kv-sharing",
)


def shared_kv(p: Planner, info: ClassInfo, fwd: cst.FunctionDef) -> None:
    """`key_states, value_states = shared_kv_states[self.kv_shared_layer_index]` (Gemma3n): the
    k/v reaching the attention are another layer's, handed in through an argument (not the cache)."""
    params = set(param_names(fwd)) - {"self"} - set(p.table.strip_params)
    for node in findall(fwd, m.Assign(targets=[m.AssignTarget(m.Tuple(elements=[m.Element(m.Name()), m.Element(m.Name())]))],
                                      value=m.Subscript(value=m.Name(m.MatchIfTrue(lambda n: n in params))))):
        raise SHARED_KV.error(p, node, f"{info.name}.forward: {code(node).strip()}")


MASK_FROM_PROJECTIONS = Refusal(
    "attention mask computed from the layer's own projections (an input-dependent bias on the "
    "scores): the engine's Attention takes no mask; no rule maps it",
    attention_example().replace("attention_interface(self, q, k, v, None)", "attention_interface(self, q, k, v, self.o_proj(v))"),
    "<example>:17: attention mask computed from the layer's own projections (an input-dependent bias on the "
    "scores): the engine's Attention takes no mask; no rule maps it in Attn.forward: "
    "attention_mask=self.o_proj(v) from o_proj (rule engine-attention)",
    rule="engine-attention",
)

TWO_ATTENTION_CALLS = Refusal(
    "two attention calls one after the other in one forward (the layer attends twice): the "
    "engine's Attention runs once per layer and caches one key/value per token; no rule maps it",
    attention_example(forward="        v, _ = attention_interface(self, q, k, v, None)\n"),
    "<example>:18: two attention calls one after the other in one forward (the layer attends twice): the "
    "engine's Attention runs once per layer and caches one key/value per token; no rule maps it in "
    "Attn.forward: attention_interface (rule engine-attention)",
    rule="engine-attention",
)


def unmapped_attention_op(p: Planner, info: ClassInfo, fwd: cst.FunctionDef, flow, projections: set[str]) -> None:
    """Attention that the engine's one `Attention` op per layer (q, k, v in; a causal or
    windowed mask of its own; one cached k/v per token) cannot express, so that PT021 would
    port it wrong: a mask computed from the layer's own projections (Doge's dynamic mask: an
    input-dependent bias on the scores), and two attention calls run one after the other
    (DiffLlama's differential attention: the same q/k against two values)."""
    for (call, _), mask in zip(flow.attention_calls, flow.attention_masks):
        if mask & projections:
            pos = [a.value for a in call.args if a.keyword is None and not a.star]
            arg = pos[4] if len(pos) > 4 else next(
                a.value for a in call.args if a.keyword is not None and a.keyword.value == "attention_mask")
            raise MASK_FROM_PROJECTIONS.error(p, call, f"{info.name}.forward: attention_mask={code(arg)} from "
                                                       f"{', '.join(sorted(mask & projections))}")
    names = p.attention_call_names()
    for block in findall(fwd, m.IndentedBlock()):
        calls = [c for st in block.body if isinstance(st, cst.SimpleStatementLine)  # type: ignore[attr-defined]
                 for c in findall(st, m.Call()) if dotted(c.func) in names]  # type: ignore[attr-defined]
        if len(calls) > 1:
            raise TWO_ATTENTION_CALLS.error(p, calls[1], f"{info.name}.forward: {code(calls[1].func)}")


SHARDED_NORM = Refusal(
    "norm over a width that tensor parallelism splits (the attention output before its "
    "output projection, or a column-parallel projection's output): each rank would normalise "
    "its own part, and it feeds no single row-parallel projection that could take the width "
    "gathered (PT242)",
    attention_example(init="        self.sub_norm = nn.LayerNorm(32)\n").replace(
        "return self.o_proj(out)", "return self.o_proj(out) + self.sub_norm(out)"),
    "<example>:12: norm over a width that tensor parallelism splits (the attention output before its output "
    "projection, or a column-parallel projection's output): each rank would normalise its own part, and it "
    "feeds no single row-parallel projection that could take the width gathered (PT242) in Attn.sub_norm: "
    "nn.LayerNorm(32) over the attention output (rule tp-linears)",
    rule="tp-linears",
)


def sharded_norm(p: Planner, info: ClassInfo, flow, roles: dict[str, str]) -> list[tuple[str, str]]:
    """A norm over a width that tensor parallelism splits: the attention output before its
    output projection, or a column-parallel projection's output (an MLP's intermediate) before
    the row-parallel one (BitNet's attn_sub_norm / ffn_sub_norm). Each rank would normalise its
    own part with its own statistics: when the norm feeds one row-parallel projection, PT242
    gathers the width before the norm and that projection takes the whole width (returned:
    (norm, row projection)); otherwise the refusal. A norm sized by the head (`Norm(head_dim)`,
    applied per head) sees whole heads."""
    sharded = {a for a, r in roles.items() if r == "column" or r.startswith("merged:")}
    gathered = []
    for attr, sub in info.submodules.items():
        if "norm" not in (sub.ctor or "").rsplit(".", 1)[-1].lower() or not sub.call.args:
            continue
        width = code(sub.call.args[0].value)
        if "head_dim" in width or "head_size" in width:
            continue
        fed = flow.module_inputs.get(attr, set())
        src = sorted(fed & sharded) or (["the attention output"] if ATTN in fed else [])
        rows = [r for r, k in roles.items() if k == "row" and attr in flow.module_inputs.get(r, set())]
        if src and len(rows) == 1 and sub.call.func is not None and len(
                [c for c in findall(info.method("forward"), m.Call(func=m.Attribute(  # type: ignore[arg-type]
                    value=m.Name("self"), attr=m.Name(attr))))]) == 1:
            gathered.append((attr, rows[0]))
        elif src:
            raise SHARDED_NORM.error(p, sub.call, f"{info.name}.{attr}: {code(sub.call.func)}({width}) over "
                                                  f"{', '.join(src)}")
    return gathered


# -- state and attention the engine does not run ----------------------------------------------------

OWN_CACHE_STATE = Refusal(
    "cannot port a layer that keeps its own state in the HF cache across calls "
    "(linear / recurrent attention, an indexer's key cache): the engine's KV cache "
    "holds only its Attention's k/v",
    attention_example() + "\n\nclass Mixer(nn.Module):\n    def __init__(self, config):\n        self.proj = nn.Linear(32, 32)\n\n"
    "    def forward(self, x, past_key_values=None):\n        state = past_key_values.get_linear_cache(0)\n"
    "        return self.proj(x) + state\n\n\n"
    "class Layer(nn.Module):\n    def __init__(self, config):\n        self.attn = Attn(config)\n"
    "        self.layers = nn.ModuleList([Mixer(config) for _ in range(2)])\n",
    "<example>:26: cannot port a layer that keeps its own state in the HF cache across calls (linear / "
    "recurrent attention, an indexer's key cache): the engine's KV cache holds only its Attention's k/v in "
    "Mixer.forward: past_key_values.get_linear_cache (rule engine-attention)",
    rule="engine-attention",
)


def own_cache_state(p: Planner, plan: PortPlan, classes: list[str]) -> None:
    """A module with projections, outside the attentions mapped to the engine's Attention, that
    reads or writes the HF cache it is handed (`past_key_values.get_linear_cache`: MiniMax's
    lightning attention; `past_key_values.layers[i].update_index`: an indexer's key cache): state
    carried from one forward to the next, which the port would drop (the engine's KV cache holds
    only what its Attention stores), so every decode step would start afresh."""
    mapped = {a.cls for a in plan.attentions}
    # only what a decoder layer builds (the model and the causal LM read the cache's length
    # for HF's own bookkeeping: get_seq_length)
    in_layers = {n for c in classes for sub in p.idx.classes[c].submodules.values()
                 if sub.in_list and sub.ctor in p.idx.classes
                 for n in p.reachable(p.idx.classes[sub.ctor])}
    for name in classes:
        info = p.idx.classes[name]
        if name in mapped or name not in in_layers or not info.linears():
            continue
        for meth in info.node.body.body:
            if not isinstance(meth, cst.FunctionDef):
                continue
            caches = [a for a in param_names(meth) if a in CACHE_PARAMS and a in p.table.strip_params]
            for use in (u for a in caches for u in findall(meth, m.Attribute(value=m.Name(a)))):
                raise OWN_CACHE_STATE.error(p, use, f"{name}.{meth.name.value}: {code(use)}")


_NO_ATTENTION_LM = _ATTN_HEAD + (
    "class Attn(nn.Module):\n    def __init__(self, config):\n{init}\n"
    "    def forward(self, x):\n{forward}\n\n\n"
    "class AModel(nn.Module):\n    def __init__(self, config):\n"
    "        self.embed_tokens = nn.Embedding(config.vocab_size, 8)\n"
    "        self.layers = nn.ModuleList([Attn(config) for _ in range(2)])\n\n\n"
    "class AForCausalLM(nn.Module):\n    def __init__(self, config):\n        self.model = AModel(config)\n"
    "        self.lm_head = nn.Linear(8, config.vocab_size)\n"
)

ATTENTION_FROM_NO_LINEAR = Refusal(
    "attention call whose q/k/v come from no nn.Linear: no rule maps these projections to the "
    "engine's parallel linears",
    _NO_ATTENTION_LM.format(init="        self.c_attn = FusedProjection(24, 8)\n",
                            forward="        q, k, v = self.c_attn(x).split(8, dim=2)\n"
                                    "        return attention_interface(self, q, k, v, None)"),
    "<example>:11: attention call whose q/k/v come from no nn.Linear: no rule maps these projections to the "
    "engine's parallel linears in Attn.forward: FusedProjection (rule fuse-qkv)",
    rule="fuse-qkv", whole_file=True,
)

ATTENTION_IN_HELPER = Refusal(
    "attention computed in a helper method, not in forward: no rule inlines it into forward",
    _NO_ATTENTION_LM.format(init="        self.proj = nn.Linear(8, 8)\n",
                            forward="        return self._attn(self.proj(x))\n\n"
                                    "    def _attn(self, q):\n        return attention_interface(self, q, q, q, None)"),
    "<example>:13: attention computed in a helper method, not in forward: no rule inlines it into forward in "
    "Attn._attn (rule engine-attention)",
    rule="engine-attention", whole_file=True,
)

ATTENTION_INLINE = Refusal(
    "attention computed inline (scores, softmax, weighted sum), not through an attention "
    "function: no rule maps it to the engine's Attention",
    _NO_ATTENTION_LM.format(init="        self.proj = nn.Linear(8, 8)\n",
                            forward="        q = self.proj(x)\n        return torch.softmax(q @ q.T, dim=-1) @ q"),
    "<example>:11: attention computed inline (scores, softmax, weighted sum), not through an attention "
    "function: no rule maps it to the engine's Attention in Attn.forward: torch.softmax (rule engine-attention)",
    rule="engine-attention", whole_file=True,
)


def _computing_methods(info) -> list[cst.FunctionDef]:
    """The methods of a class that its `forward` reaches through `self.NAME` (and forward itself):
    what the model computes with. A sampling helper of remote code's causal LM (ChatGLM's
    `stream_generate` takes a softmax over the logits) is not an attention."""
    methods = {n.name.value: n for n in info.node.body.body if isinstance(n, cst.FunctionDef)}
    if "forward" not in methods:  # a base or helper class: whatever a subclass's forward calls
        return list(methods.values())
    seen: set[str] = set()
    todo = ["forward"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [a.attr.value for a in findall(methods[name], m.Attribute(value=m.Name("self"), attr=m.Name()))
                 if a.attr.value in methods]  # type: ignore[attr-defined]
    return [fn for n, fn in methods.items() if n in seen]


def unmapped_attention(p: Planner, classes: list[str]) -> None:
    """A decoder whose attention no rule maps to the engine's Attention: names the projections
    of an attention function fed by something other than nn.Linear (GPT-2's Conv1D), else the
    softmax of an attention written inline (Bloom's ALiBi baddbmm, GPT-J's `_attn`)."""
    attn_names = p.attention_call_names()
    for name in classes:
        info = p.idx.classes[name]
        fwd = info.method("forward")
        calls = [c for c in findall(fwd, m.Call()) if dotted(c.func) in attn_names] if fwd else []  # type: ignore[attr-defined]
        if calls:
            ctors = sorted({(s.ctor or "").rsplit(".", 1)[-1] for s in info.submodules.values()
                            if s.ctor not in LINEAR_NAMES and not (s.ctor or "").startswith("torch.")
                            and s.ctor not in p.idx.classes})
            raise ATTENTION_FROM_NO_LINEAR.error(
                p, calls[0], f"{name}.forward: {', '.join(ctors) or 'projections not found'}")
    for name in classes:
        for meth in _computing_methods(p.idx.classes[name]):
            if meth.name.value == "forward":
                continue
            for call in findall(meth, m.Call()):
                if dotted(call.func) in attn_names:  # type: ignore[attr-defined]
                    raise ATTENTION_IN_HELPER.error(p, call, f"{name}.{meth.name.value}")
    for name in classes:
        for meth in _computing_methods(p.idx.classes[name]):
            # softmax(x), F.softmax(x), x.softmax(-1), and a module built on the spot: nn.Softmax(dim=-1)(x)
            softmax = m.Attribute(attr=m.Name("softmax")) | m.Name("softmax") | m.Call(
                func=m.Attribute(attr=m.Name("Softmax")) | m.Name("Softmax"))
            for call in findall(meth, m.Call(func=softmax)):
                raise ATTENTION_INLINE.error(p, call, f"{name}.{meth.name.value}: {code(call.func)}")
