"""PT240 per-layer-rope: the rule `PerLayerRope`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import findall, names_in, self_attr
from porter.passes.base import Example, Rule

_ROTARY_CALL = m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name("rotary_emb")))
_GET_ROPE = m.SimpleStatementLine(body=[m.Assign(
    targets=[m.AssignTarget(m.Attribute(value=m.Name("self"), attr=m.Name("rotary_emb")))],
    value=m.Call(func=m.Name("get_rope")))])

_ATTN_INIT = (
    "class Attn(nn.Module):\n    def __init__(self, config, layer_idx):\n        super().__init__()\n"
    "        self.head_dim = config.head_dim\n"
    "        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n"
    "        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
    "        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
)
_ATTN_FWD = (
    "    def forward(self, x, position_embeddings):\n        q = self.q_proj(x)\n"
    "        k = self.k_proj(x)\n        v = self.v_proj(x)\n"
    "        if position_embeddings is not None:\n{rot}"
    "        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)\n"
    "        return out\n"
)
_MODEL = (
    "\n\nclass Model(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.layers = nn.ModuleList([Attn(config, i) for i in range(config.num_hidden_layers)])\n"
    "{tables}"
    "    def forward(self, h, position_ids):\n{by_theta}"
    "        for i, layer in enumerate(self.layers):\n"
    "            theta = self.config.layer_rope_theta[i]\n"
    "            h = layer(h, position_embeddings=by_theta[theta] if theta else None)\n"
    "        return h\n"
)
_TABLES = (
    "        self.rotary_embs = nn.ModuleList()\n"
    "        for theta in sorted({t for t in config.layer_rope_theta if t}):\n"
    "            theta_config = copy.deepcopy(config)\n"
    "            theta_config.rope_parameters = {**config.rope_parameters, \"rope_theta\": theta}\n"
    "            self.rotary_embs.append(ARotaryEmbedding(theta_config))\n\n"
)
_BY_THETA = (
    "        by_theta = {r.config.rope_parameters[\"rope_theta\"]: r(h, position_ids) for r in self.rotary_embs}\n"
)
_ROTARY = (
    "from torch import nn\n\n\ndef apply_rotary_pos_emb(q, k, cos, sin):\n"
    "    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin\n\n\n"
    "class ARotaryEmbedding(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.inv_freq = 1.0 / config.rope_parameters[\"rope_theta\"]\n\n"
    "    def forward(self, x, position_ids):\n        return (position_ids * self.inv_freq).cos(), (position_ids * self.inv_freq).sin()\n\n\n"
)
_GET = ("        self.rotary_emb = get_rope(self.head_dim, max_position=config.max_position_embeddings, "
        "rope_parameters=config.rope_parameters, is_neox_style=True)\n\n")
_BEFORE = (_ROTARY + _ATTN_INIT + _GET + _ATTN_FWD.format(  # (get_rope: as engine-rope builds it)
    rot="            cos, sin = position_embeddings\n            q, k = apply_rotary_pos_emb(q, k, cos, sin)\n")
    + _MODEL.format(tables=_TABLES, by_theta=_BY_THETA))
_AFTER = (_ROTARY + _ATTN_INIT
          + "        self.use_rope = bool(config.layer_rope_theta[layer_idx])\n        if self.use_rope:\n"
          + "    " + _GET.replace("config.rope_parameters,", "{**config.rope_parameters, \"rope_theta\": "
                                  "config.layer_rope_theta[layer_idx]},")
          + _ATTN_FWD.replace("if position_embeddings is not None:", "if self.use_rope:").format(
              rot="            cos, sin = position_embeddings\n            q, k = apply_rotary_pos_emb(q, k, cos, sin)\n")
          + _MODEL.format(tables="\n", by_theta=_BY_THETA))

# one table or none for every layer, by config (granitemoehybrid's position_embedding_type)
_OPTIONAL = (
    "\n\nclass Model(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.layers = nn.ModuleList([Attn(config, i) for i in range(config.num_hidden_layers)])\n"
    "{table}"
    "    def forward(self, h, position_ids):\n        position_embeddings = None\n"
    "        if self.rotary_emb is not None:\n"
    "            position_embeddings = self.rotary_emb(h, position_ids)\n"
    "        for layer in self.layers:\n            h = layer(h, position_embeddings=position_embeddings)\n"
    "        return h\n"
)
_OPTIONAL_ROT = "            cos, sin = position_embeddings\n            q, k = apply_rotary_pos_emb(q, k, cos, sin)\n"
_OPTIONAL_BEFORE = (_ROTARY + _ATTN_INIT + _GET + _ATTN_FWD.format(rot=_OPTIONAL_ROT) + _OPTIONAL.format(
    table='        self.rotary_emb = ARotaryEmbedding(config) if config.position_embedding_type == "rope" else None\n\n'))
_OPTIONAL_AFTER = (_ROTARY + _ATTN_INIT
                   + '        self.use_rope = config.position_embedding_type == "rope"\n        if self.use_rope:\n'
                   + "    " + _GET
                   + _ATTN_FWD.replace("if position_embeddings is not None:", "if self.use_rope:").format(rot=_OPTIONAL_ROT)
                   + _OPTIONAL.format(table="\n"))
# one rotary module with a table per layer type, None for the NoPE types (CohereCompass)
_BY_TYPE_ROTARY = (
    "from torch import nn\n\n\ndef apply_rotary_pos_emb(q, k, cos, sin):\n"
    "    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin\n\n\n"
    "class ARotaryEmbedding(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        for t in set(config.layer_types):\n"
    "            setattr(self, f\"{t}_inv_freq\", 1.0 / config.rope_parameters[t][\"rope_theta\"])\n\n"
    "    def forward(self, x, position_ids, t):\n        inv_freq = getattr(self, f\"{t}_inv_freq\")\n"
    "        return (position_ids * inv_freq).cos(), (position_ids * inv_freq).sin()\n\n\n"
)
_BY_TYPE_MODEL = (
    "\n\nclass Model(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.layers = nn.ModuleList([Attn(config, i) for i in range(config.num_hidden_layers)])\n"
    "        self.rotary_emb = ARotaryEmbedding(config)\n\n"
    "    def forward(self, h, position_ids):\n"
    "        tables = {\n            t: (self.rotary_emb(h, position_ids, t) "
    "if self.config.rope_parameters[t] is not None else None)\n"
    "            for t in dict.fromkeys(self.config.layer_types)\n        }\n"
    "        for i, layer in enumerate(self.layers):\n"
    "            h = layer(h, position_embeddings=tables[self.config.layer_types[i]])\n"
    "        return h\n"
)
_BY_TYPE_PARAMS = "config.rope_parameters[config.layer_types[layer_idx]]"
_BY_TYPE_BEFORE = (_BY_TYPE_ROTARY + _ATTN_INIT + _GET.replace("config.rope_parameters,", _BY_TYPE_PARAMS + ",")
                   + _ATTN_FWD.format(rot="            cos, sin = position_embeddings\n"
                                          "            q, k = apply_rotary_pos_emb(q, k, cos, sin)\n")
                   + _BY_TYPE_MODEL)
_BY_TYPE_AFTER = (_BY_TYPE_ROTARY + _ATTN_INIT
                  + f"        self.use_rope = {_BY_TYPE_PARAMS} is not None\n        if self.use_rope:\n"
                  + "    " + _GET.replace("config.rope_parameters,", _BY_TYPE_PARAMS + ",")
                  + _ATTN_FWD.replace("if position_embeddings is not None:", "if self.use_rope:").format(
                      rot="            cos, sin = position_embeddings\n"
                          "            q, k = apply_rotary_pos_emb(q, k, cos, sin)\n")
                  + _BY_TYPE_MODEL)

# the same tables filled by a loop over the layer types, None in one arm of a test (Beam)
_BY_TYPE_LOOP_MODEL = _BY_TYPE_MODEL.replace(
    "        tables = {\n            t: (self.rotary_emb(h, position_ids, t) "
    "if self.config.rope_parameters[t] is not None else None)\n"
    "            for t in dict.fromkeys(self.config.layer_types)\n        }\n",
    "        tables, scales = {}, {}\n        for t in set(self.config.layer_types):\n"
    "            if self.config.rope_parameters[t] is None:\n"
    "                tables[t] = None\n                scales[t] = 2.0\n"
    "            else:\n                tables[t] = self.rotary_emb(h, position_ids, t)\n"
    "                scales[t] = None\n")
_BY_TYPE_LOOP_BEFORE = _BY_TYPE_BEFORE.replace(_BY_TYPE_MODEL, _BY_TYPE_LOOP_MODEL)
_BY_TYPE_LOOP_AFTER = _BY_TYPE_AFTER.replace(_BY_TYPE_MODEL, _BY_TYPE_LOOP_MODEL)
assert _BY_TYPE_LOOP_MODEL != _BY_TYPE_MODEL

# one table, handed only to the layers of one type (LaraMini)
_ONE_TABLE_MODEL = (
    "\n\nclass Model(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.layers = nn.ModuleList([Attn(config, i) for i in range(config.num_hidden_layers)])\n"
    "{table}"
    "    def forward(self, h, position_ids):\n        table = self.rotary_emb(h, position_ids)\n"
    "        for i, layer in enumerate(self.layers):\n"
    "            layer_type = self.config.layer_types[i]\n"
    "            h = layer(h, position_embeddings=table if layer_type == \"sliding_attention\" else None)\n"
    "        return h\n"
)
_ONE_TABLE_BEFORE = (_ROTARY + _ATTN_INIT + _GET + _ATTN_FWD.format(rot=_OPTIONAL_ROT)
                     + _ONE_TABLE_MODEL.format(table="        self.rotary_emb = ARotaryEmbedding(config=config)\n\n"))
_ONE_TABLE_AFTER = (_ROTARY + _ATTN_INIT
                    + '        self.use_rope = config.layer_types[layer_idx] == "sliding_attention"\n'
                    + "        if self.use_rope:\n    " + _GET
                    + _ATTN_FWD.replace("if position_embeddings is not None:", "if self.use_rope:").format(rot=_OPTIONAL_ROT)
                    + _ONE_TABLE_MODEL.format(table="\n"))

# the rotary module keeps a table only for the types whose rope_parameters are not None (it skips the
# others in the loop that fills its `rope_type` dict); the model hands each layer `tables.get(type)`,
# the types zipped with the layers (Ergo)
_KEYS_ROTARY = (
    "from torch import nn\n\n\ndef apply_rotary_pos_emb(q, k, cos, sin):\n"
    "    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin\n\n\n"
    "class ARotaryEmbedding(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.config = config\n        self.layer_types = sorted(set(config.layer_types))\n"
    "        self.rope_type = {}\n        for t in self.layer_types:\n"
    "            params = self.config.rope_parameters[t]\n            if params is None:\n                continue\n"
    "            self.rope_type[t] = params[\"rope_type\"]\n"
    "            setattr(self, f\"{t}_inv_freq\", 1.0 / params[\"rope_theta\"])\n\n"
    "    def forward(self, x, position_ids, t):\n        inv_freq = getattr(self, f\"{t}_inv_freq\")\n"
    "        return (position_ids * inv_freq).cos(), (position_ids * inv_freq).sin()\n\n\n"
)
_KEYS_MODEL = (
    "\n\nclass Model(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.layers = nn.ModuleList([Attn(config, i) for i in range(config.num_hidden_layers)])\n"
    "        self.rotary_emb = ARotaryEmbedding(config=config)\n\n"
    "    def forward(self, h, position_ids):\n"
    "        tables = {t: self.rotary_emb(h, position_ids, t) for t in self.rotary_emb.rope_type}\n"
    "        for layer_type, layer in zip(self.config.layer_types, self.layers, strict=True):\n"
    "            h = layer(h, position_embeddings=tables.get(layer_type))\n"
    "        return h\n"
)
_KEYS_BEFORE = _BY_TYPE_BEFORE.replace(_BY_TYPE_ROTARY, _KEYS_ROTARY).replace(_BY_TYPE_MODEL, _KEYS_MODEL)
_KEYS_AFTER = _BY_TYPE_AFTER.replace(_BY_TYPE_ROTARY, _KEYS_ROTARY).replace(_BY_TYPE_MODEL, _KEYS_MODEL)
assert _KEYS_BEFORE != _BY_TYPE_BEFORE and _KEYS_AFTER != _BY_TYPE_AFTER


class PerLayerRope(Rule):
    descend_methods = frozenset()  # works on __init__ and forward as a whole
    code = "PT240"
    name = "per-layer-rope"
    why = (
        "Some models rotate q/k in some layers only (the others have no position encoding, NoPE): "
        "the model hands each layer a cos/sin table or None, chosen by a config list "
        "(`theta = config.layer_rope_theta[i]; tables[theta] if theta else None`, one table per "
        "distinct base; or `tables[config.layer_types[i]]` where `tables = {t: (rotary(..., t) if "
        "config.rope_parameters[t] is not None else None) for t in ...}`, or the same dict filled by a loop over the "
        "types that sets `tables[t] = None` in one arm of a test and the table in the other, or `tables.get(t)` where `tables = {t: rotary(..., t) for t in rotary.rope_type}` and the rotary module fills that dict in one loop over the config's layer types that skips (`if ...: continue`) the types without rotary, the layer types zipped with the layers), and the attention rotates under `if position_embeddings is not None:`. "
        "The planner follows that argument from the attention to the loop over the layers and reads "
        "the choice and the table as expressions of `config` and `layer_idx`. As the engine's own "
        "ports do, the attention builds its rotary only when it uses it (`self.use_rope = ...; if "
        "self.use_rope: self.rotary_emb = get_rope(..., rope_parameters={**config.rope_parameters, "
        "'rope_theta': <this layer's>})`) and rotates under `if self.use_rope:`; the model's tables "
        "and the loop that builds them go. A model that builds one table or none by config (`self.rotary_emb = "
        "R(config) if config.position_embedding_type == 'rope' else None`, handed to every layer under `if "
        "self.rotary_emb is not None:`) is the same choice with one table: the config's rope_parameters; so is one table handed to some layers "
        "only (`t = self.rotary_emb(h, pos)`, `t if layer_type == 'sliding_attention' else None`)."
    )
    examples = [Example(_BEFORE, _AFTER), Example(_OPTIONAL_BEFORE, _OPTIONAL_AFTER),
                Example(_BY_TYPE_BEFORE, _BY_TYPE_AFTER), Example(_BY_TYPE_LOOP_BEFORE, _BY_TYPE_LOOP_AFTER),
                Example(_ONE_TABLE_BEFORE, _ONE_TABLE_AFTER), Example(_KEYS_BEFORE, _KEYS_AFTER)]

    @classmethod
    def applies(cls, ctx) -> bool:
        return any(a.rope_when for a in ctx.plan.attentions)

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        if not self.kept(cls) or len(self.scope) != 1:
            return updated
        attn = self.plan.attention(cls or "")
        if attn and attn.rope_when:
            return self._attention(cls, attn, updated)
        tables = {t.split(".", 1)[1] for a in self.plan.attentions if a.rope_tables
                  for t in [a.rope_tables] if t.split(".", 1)[0] == cls}
        if tables and updated.name.value == "__init__":
            return self._drop_tables(cls, tables, updated)
        return updated

    def _attention(self, cls: str, attn, fn: cst.FunctionDef) -> cst.FunctionDef:
        flag = "use_rope" if "use_rope" not in self.ctx.idx.identifiers else "rotary_in_layer"
        body: list[cst.BaseStatement] = []
        for st in fn.body.body:
            if fn.name.value == "__init__" and m.matches(st, _GET_ROPE):
                call = st.body[0].value  # type: ignore[attr-defined]
                args = [a.with_changes(value=cst.parse_expression(attn.rope_params))
                        if a.keyword is not None and a.keyword.value == "rope_parameters" else a for a in call.args]
                rope = st.with_changes(body=[st.body[0].with_changes(value=call.with_changes(args=args))])  # type: ignore[attr-defined]
                when = cst.parse_expression(attn.rope_when)
                test = attn.rope_when if isinstance(when, cst.Comparison) else f"bool({attn.rope_when})"
                body.append(cst.parse_statement(f"self.{flag} = {test}\n"))
                body.append(cst.If(test=cst.parse_expression(f"self.{flag}"), body=cst.IndentedBlock([rope])))
                self.mark(f"{cls}.__init__")
                continue
            if fn.name.value == "forward" and isinstance(st, cst.If) and (findall(st.body, _ROTARY_CALL) or findall(
                    st.body, m.Call(func=m.Name(attn.rope_helper or "")))) \
                    and names_in(st.test) & set(self.ctx.table.strip_params):
                st = st.with_changes(test=cst.parse_expression(f"self.{flag}"))
                self.mark(f"{cls}.forward")
            body.append(st)
        return fn.with_changes(body=fn.body.with_changes(body=body))

    def _drop_tables(self, cls: str, tables: set[str], fn: cst.FunctionDef) -> cst.FunctionDef:
        """`self.rotary_embs = nn.ModuleList()` and the loop appending one rotary per base go."""
        body = []
        for st in fn.body.body:
            assigns = findall(st, m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))])) \
                if isinstance(st, cst.SimpleStatementLine) else []
            if assigns and all(self_attr(a.targets[0].target) in tables for a in assigns):  # type: ignore[attr-defined]
                continue
            if isinstance(st, cst.For) and any(
                    self_attr(c.func.value) in tables for c in findall(  # type: ignore[attr-defined]
                        st, m.Call(func=m.Attribute(value=m.Attribute(value=m.Name("self")), attr=m.Name("append"))))):
                continue
            body.append(st)
        for t in tables:
            self.ctx.removed_attrs.add((cls, t))
        self.mark(f"{cls}.__init__")
        return fn.with_changes(body=fn.body.with_changes(body=body))
