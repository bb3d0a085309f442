"""PT293 kv-sharing-attention: the rule `KvSharingAttention`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, findall
from porter.passes._edit import is_assign_of
from porter.passes.base import Example, Rule
from porter.plan.model import AttentionPlan

HELPER = "kv_sharing_target"
KEY_ATTR = "kv_share_key"
_SRC = '''def {helper}(key) -> str:
    """The attention layer built last of those that store their k/v for the layers reading them
    under KEY: layers are built in forward order, and the engine registers each as it is built."""
    layers = {get_config}().compilation_config.static_forward_context
    return [name for name, layer in layers.items() if getattr(layer, "{attr}", None) == key][-1]
'''

_INIT = (
    "class Attn(nn.Module):\n    def __init__(self, config, layer_idx, quant_config=None, prefix=''):\n"
    "        super().__init__()\n        self.head_dim = config.head_dim\n"
    "        self.shared = layer_idx >= 2\n        self.store = layer_idx == 1\n        self.kind = 'full'\n"
)
_BEFORE = (
    "from torch import nn\n\n\n" + _INIT
    + "        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_heads, config.num_kv_heads, "
    "bias=False, quant_config=quant_config, prefix=f'{prefix}.qkv_proj')\n"
    "        self.q_size = self.qkv_proj.num_heads * self.head_dim\n"
    "        self.kv_size = self.qkv_proj.num_kv_heads * self.head_dim\n"
    "        if not self.shared:\n            self.k_norm = Norm(self.head_dim)\n"
    "            self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim, bias=False)\n"
    "            self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim, bias=False)\n"
    "        self.attn = Attention(self.qkv_proj.num_heads, self.head_dim, num_kv_heads=self.qkv_proj.num_kv_heads, "
    "prefix=f'{prefix}.attn')\n\n"
    "    def forward(self, x, positions):\n        qkv, _ = self.qkv_proj(x)\n"
    "        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)\n"
    "        if self.shared:\n            k, v = None, None\n        else:\n            k = self.k_norm(k)\n"
    "        return self.attn(q, k, v)\n"
)
_AFTER = (
    "from torch import nn\n\n\n" + _INIT
    + "        if self.shared:\n"
    "            self.q_proj = ColumnParallelLinear(config.hidden_size, config.num_heads * self.head_dim, bias=False, "
    "quant_config=quant_config, prefix=f\"{prefix}.q_proj\")\n"
    "            self.q_size = self.q_proj.output_size_per_partition\n"
    "            self.kv_size = max(1, config.num_kv_heads // get_tensor_model_parallel_world_size()) * self.head_dim\n"
    "        else:\n"
    "            self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_heads, config.num_kv_heads, "
    "bias=False, quant_config=quant_config, prefix=f'{prefix}.qkv_proj')\n"
    "            self.q_size = self.qkv_proj.num_heads * self.head_dim\n"
    "            self.kv_size = self.qkv_proj.num_kv_heads * self.head_dim\n"
    "        if not self.shared:\n            self.k_norm = Norm(self.head_dim)\n"
    "        self.attn = Attention(self.q_size // self.head_dim, self.head_dim, num_kv_heads=self.kv_size // self.head_dim, "
    "prefix=f'{prefix}.attn', kv_sharing_target_layer_name=kv_sharing_target(self.kind) if self.shared else None)\n"
    "        if self.store:\n            self.attn.kv_share_key = self.kind\n\n"
    "    def forward(self, x, positions):\n        if self.shared:\n            q, _ = self.q_proj(x)\n"
    "        else:\n            qkv, _ = self.qkv_proj(x)\n"
    "            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)\n"
    "        if self.shared:\n            k, v = None, None\n        else:\n            k = self.k_norm(k)\n"
    "        return self.attn(q, k, v)\n\n\n"
    + _SRC.format(helper=HELPER, get_config="get_current_vllm_config", attr=KEY_ATTR)
)


class KvSharingAttention(Rule):
    descends = True
    descend_methods = frozenset()
    code = "PT293"
    name = "kv-sharing-attention"
    why = (
        "A layer that reads another layer's k/v (PT291) projects only its queries, as in HF (which builds "
        "its k/v projections only in the other layers) and in vLLM's gemma4: there its fused `qkv_proj` "
        "becomes `q_proj`, a `ColumnParallelLinear`, built and called under the layer's own test; the k/v "
        "projections HF builds under the other arm go with the fusion. Its `Attention` takes the name of "
        "the layer whose cache it reads (`kv_sharing_target_layer_name`): the layers that store their k/v "
        "(the test HF stores them under) mark their attention op with the key they store under, and a "
        "reading layer takes the last one built under its own key, as HF's dict would hand it at run time "
        "(layers are built in forward order; the engine registers each op in `static_forward_context`). "
        "Its per-rank heads come from `q_size` / `kv_size`, set in both arms."
    )
    examples = [Example(_BEFORE, _AFTER, seed={"attentions": [AttentionPlan(  # what the planner found in HF's form
        cls="Attn", q="q_proj", k="k_proj", v="v_proj", o=None, head_dim="self.head_dim", num_heads="config.num_heads",
        num_kv_heads="config.num_kv_heads", hidden_size="config.hidden_size", bias="False", scale="1.0",
        sliding_window=None, softcap=None, rope=None, rope_helper=None, line=4, kv_shared_when="self.shared",
        kv_read_key="self.kind", kv_write_when="self.store", kv_write_key="self.kind", kv_param="shared_kv")]})]
    reads_target = True  # the engine's config accessor differs between targets

    @classmethod
    def classes(cls, ctx) -> set[str] | None:
        return {a.cls for a in ctx.plan.attentions if a.kv_shared_when and not a.packed}

    @classmethod
    def applies(cls, ctx) -> bool:
        return bool(cls.classes(ctx))

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        attn = self.plan.attention(cls or "")
        if len(self.scope) != 1 or attn is None or not attn.kv_shared_when:
            return updated
        if updated.name.value == "__init__":
            return self._init(attn, updated)
        if updated.name.value == "forward":
            return self._forward(attn, updated)
        return updated

    def _error(self, attn, what: str):
        return self.ctx.idx.error(f"cannot port KV sharing: {what}", construct=f"{attn.cls}", rule=self.name)

    def _init(self, attn, fn: cst.FunctionDef) -> cst.FunctionDef:
        body = list(fn.body.body)
        at = next((i for i, st in enumerate(body) if is_assign_of(st, "qkv_proj")), None)
        if at is None or not all(is_assign_of(body[at + j], a) for j, a in ((1, "q_size"), (2, "kv_size"))):
            raise self._error(attn, "the fused qkv projection is not where PT023 built it")
        self._defined_before(attn, body[:at], attn.kv_shared_when)
        hd, use = attn.head_dim, self.ctx.use
        shared = cst.parse_module(
            f"self.q_proj = {use('ColumnParallelLinear')}({attn.hidden_size}, {attn.num_heads} * {hd}, "
            f"bias={attn.bias}, quant_config=quant_config, prefix=f\"{{prefix}}.q_proj\")\n"
            "self.q_size = self.q_proj.output_size_per_partition\n"
            f"self.kv_size = max(1, {attn.num_kv_heads} // {use('get_tensor_model_parallel_world_size')}()) * {hd}\n").body
        split = cst.If(test=cst.parse_expression(attn.kv_shared_when), body=cst.IndentedBlock(body=shared),
                       orelse=cst.Else(body=cst.IndentedBlock(body=body[at:at + 3])),
                       leading_lines=body[at].leading_lines)
        body = [*body[:at], split, *body[at + 3:]]
        gone = {attn.k, attn.v}
        body = [_without_builds(st, gone) for st in body]
        body = [st for st in body if st is not None]
        out: list[cst.BaseStatement] = []
        op = m.Call(func=m.Name(self.ctx.bound_name("Attention")))
        for st in body:
            if is_assign_of(st, "attn") and findall(st, op):
                self._defined_before(attn, out, attn.kv_read_key, attn.kv_write_when, attn.kv_write_key)
                st = st.visit(_AttentionArgs(attn, hd))
                out.append(st)
                out.append(cst.parse_statement(
                    f"if {attn.kv_write_when}:\n    self.attn.{KEY_ATTR} = {attn.kv_write_key}\n"))
                continue
            out.append(st)
        self.ctx.engine_symbols.add("get_current_engine_config")
        self.mark(f"{attn.cls}.__init__")
        return fn.with_changes(body=fn.body.with_changes(body=out))

    def _defined_before(self, attn, stmts, *exprs: str | None) -> None:
        """The tests and keys read in __init__ must only read `self` attributes set above (they are
        computed when the layer is built, not in forward)."""
        set_above = {a.target.attr.value for st in stmts for a in findall(st, m.AssignTarget(  # type: ignore[attr-defined]
            m.Attribute(value=m.Name("self"))))}
        for e in exprs:
            used = {a.attr.value for a in findall(cst.parse_expression(e or "None"),  # type: ignore[attr-defined]
                                                  m.Attribute(value=m.Name("self")))}
            if used - set_above:
                raise self._error(attn, f"`{e}` reads what __init__ sets only later or never "
                                        f"({', '.join(sorted(used - set_above))})")

    def _forward(self, attn, fn: cst.FunctionDef) -> cst.FunctionDef:
        body = list(fn.body.body)
        call = m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name("qkv_proj")))
        at = next((i for i, st in enumerate(body) if findall(st, call)), None)
        if at is None or at + 1 >= len(body) or not findall(body[at + 1], m.Call(func=m.Attribute(attr=m.Name("split")))):
            raise self._error(attn, "the fused qkv projection's call and split are not where PT023 wrote them")
        q = code(body[at + 1].body[0].targets[0].target.elements[0].value)  # type: ignore[attr-defined]
        x = code(findall(body[at], call)[0].args[0].value)  # type: ignore[attr-defined]
        split = cst.If(test=cst.parse_expression(attn.kv_shared_when),
                       body=cst.IndentedBlock(body=[cst.parse_statement(f"{q}, _ = self.q_proj({x})\n")]),
                       orelse=cst.Else(body=cst.IndentedBlock(body=body[at:at + 2])), leading_lines=body[at].leading_lines)
        self.mark(f"{attn.cls}.forward")
        return fn.with_changes(body=fn.body.with_changes(body=[*body[:at], split, *body[at + 2:]]))

    def leave_Module(self, original, updated):
        if not findall(updated, m.Call(func=m.Name(HELPER))):
            return updated
        src = _SRC.format(helper=HELPER, get_config=self.ctx.use("get_current_engine_config"), attr=KEY_ATTR)
        self.mark(HELPER)
        helper = [st.with_changes(leading_lines=[cst.EmptyLine(), cst.EmptyLine()]) if i == 0 else st
                  for i, st in enumerate(cst.parse_module(src).body)]
        return updated.with_changes(body=[*updated.body, *helper])


def _without_builds(st: cst.BaseStatement, gone: set[str]) -> cst.BaseStatement | None:
    """ST without the builds of `self.<gone>` (nested in an `if` too); None when nothing is left."""
    if any(is_assign_of(st, a) for a in gone):
        return None
    if isinstance(st, cst.If):
        inner = [s for s in (_without_builds(x, gone) for x in st.body.body) if s is not None]  # type: ignore[attr-defined]
        if not inner:
            return None
        return st.with_changes(body=st.body.with_changes(body=inner))
    return st


class _AttentionArgs(cst.CSTTransformer):
    """The engine Attention's per-rank heads from q_size / kv_size (set in both arms), and the layer
    whose cache a reading layer uses."""

    def __init__(self, attn, hd: str) -> None:
        super().__init__()
        self.attn, self.hd = attn, hd

    def leave_Attribute(self, original, updated):
        if m.matches(updated, m.Attribute(value=m.Attribute(value=m.Name("self"), attr=m.Name("qkv_proj")))):
            size = {"num_heads": "q_size", "num_kv_heads": "kv_size"}.get(updated.attr.value)
            if size:
                return cst.parse_expression(f"self.{size} // {self.hd}")
        return updated

    def leave_Call(self, original, updated):
        if not updated.args or not m.matches(updated.args[-1], m.Arg(keyword=m.Name("prefix"))):
            return updated
        target = cst.parse_expression(f"{HELPER}({self.attn.kv_read_key}) if {self.attn.kv_shared_when} else None")
        return updated.with_changes(args=[*updated.args[:-1], updated.args[-1].with_changes(
            comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))),
            cst.Arg(target, keyword=cst.Name("kv_sharing_target_layer_name"),
                    equal=cst.AssignEqual(whitespace_before=cst.SimpleWhitespace(""),
                                          whitespace_after=cst.SimpleWhitespace("")))])
