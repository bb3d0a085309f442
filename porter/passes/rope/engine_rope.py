"""PT020 engine-rope: the rule `EngineRope`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import assigned_names, findall, param_names
from porter.analysis.layouts import last_axis_part
from porter.errors import PorterError
from porter.passes._edit import append_to_init, is_assign_of
from porter.passes.base import Example, Rule

_ROPE_TABLE_BY_KEY = m.Subscript(value=m.Attribute(attr=m.Name("rope_parameters")),
                                 slice=[m.SubscriptElement(slice=m.Index(value=m.Name()))])


def _rope_by_layer_type(ctx) -> bool:
    """The HF rotary module builds one table per layer type (`config.rope_parameters[layer_type]`)."""
    classes = ctx.idx.classes
    return any(findall(classes[c].node, _ROPE_TABLE_BY_KEY)
               for c in ctx.plan.rotary_classes if c in classes)


def _guarded_build(st: cst.CSTNode, own: set[str]) -> bool:
    """`st` is an `if` (no else) whose body only builds the attention's own rotary modules: the
    module goes with its guard (the engine's rotary replaces it, built where the attention is)."""
    if not isinstance(st, cst.If) or st.orelse is not None or not own:
        return False
    return all(any(is_assign_of(s, a) for a in own) or _guarded_build(s, own) for s in st.body.body)


class EngineRope(Rule):
    descend_methods = frozenset({"forward"})
    code = "PT020"
    name = "engine-rope"
    why = (
        "HF computes cos/sin once per model (a RotaryEmbedding module) and threads them to every "
        "attention as `position_embeddings`. The engine's `get_rope` module lives in the attention "
        "and rotates flat q/k in place from `positions`: `q, k = self.rotary_emb(positions, q, k)`. "
        "The HF rotary module is removed (with the `if` that only guards its construction, "
        "4.x Falcon's `if config.rotary:`); its layout (NeoX halves or GPT-J interleaved) is read from "
        "the source's rotate helper; rope_theta, scaling and partial factor come from "
        "`config.rope_parameters` at run time. A helper rotating one tensor per call (Gemma-4's "
        "`x = apply_rotary_pos_emb(x, cos, sin)`) becomes `self.rotary_emb(positions, x, None)[0]`."
    )
    examples = [
        Example(  # a helper rotating one tensor per call (Gemma-4): the engine's rotary on that tensor alone
            "from torch import nn\n\n\ndef apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim=1):\n"
            "    return x * cos.unsqueeze(unsqueeze_dim) + rotate_half(x) * sin.unsqueeze(unsqueeze_dim)\n\n\n"
            "class Attn(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.head_dim = config.head_dim\n"
            "        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n"
            "        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
            "        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n\n"
            "    def forward(self, x, position_embeddings):\n        cos, sin = position_embeddings\n"
            "        q = apply_rotary_pos_emb(self.q_proj(x), cos, sin, unsqueeze_dim=2)\n"
            "        k = apply_rotary_pos_emb(self.k_proj(x), cos, sin, unsqueeze_dim=2)\n        v = self.v_proj(x)\n"
            "        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)\n"
            "        return out\n",
            "from torch import nn\n\n\ndef apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim=1):\n"
            "    return x * cos.unsqueeze(unsqueeze_dim) + rotate_half(x) * sin.unsqueeze(unsqueeze_dim)\n\n\n"
            "class Attn(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.head_dim = config.head_dim\n"
            "        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n"
            "        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
            "        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
            "        self.rotary_emb = get_rope(self.head_dim, "
            "max_position=config.max_position_embeddings, rope_parameters=config.rope_parameters, "
            "is_neox_style=True)\n\n"
            "    def forward(self, x, position_embeddings):\n        cos, sin = position_embeddings\n"
            "        q = self.rotary_emb(positions, self.q_proj(x), None)[0]\n"
            "        k = self.rotary_emb(positions, self.k_proj(x), None)[0]\n        v = self.v_proj(x)\n"
            "        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)\n"
            "        return out\n",
        ),
        Example(  # the attention's own rotary module, built under a guard (4.x Falcon's `if config.rotary:`)
            "from torch import nn\n\n\ndef apply_rotary_pos_emb(q, k, cos, sin):\n"
            "    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin\n\n\n"
            "class ARotaryEmbedding(nn.Module):\n"
            "    def __init__(self, config):\n        super().__init__()\n"
            "        self.inv_freq = 1.0 / config.rope_theta\n\n"
            "    def forward(self, x, position_ids):\n        return self.inv_freq\n\n\n"
            "class Attn(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.head_dim = config.head_dim\n"
            "        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n"
            "        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
            "        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
            "        if config.rotary:\n            self.rotary_emb = ARotaryEmbedding(config)\n\n"
            "    def forward(self, x, position_embeddings):\n        q = self.q_proj(x)\n"
            "        k = self.k_proj(x)\n        v = self.v_proj(x)\n"
            "        cos, sin = position_embeddings\n"
            "        q, k = apply_rotary_pos_emb(q, k, cos, sin)\n"
            "        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)\n"
            "        return out\n",
            "from torch import nn\n\n\ndef apply_rotary_pos_emb(q, k, cos, sin):\n"
            "    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin\n\n\n"
            "class ARotaryEmbedding(nn.Module):\n"
            "    def __init__(self, config):\n        super().__init__()\n"
            "        self.inv_freq = 1.0 / config.rope_theta\n\n"
            "    def forward(self, x, position_ids):\n        return self.inv_freq\n\n\n"
            "class Attn(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.head_dim = config.head_dim\n"
            "        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n"
            "        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
            "        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n"
            "        self.rotary_emb = get_rope(self.head_dim, "
            "max_position=config.max_position_embeddings, rope_parameters=config.rope_parameters, "
            "is_neox_style=True)\n\n"
            "    def forward(self, x, position_embeddings):\n        q = self.q_proj(x)\n"
            "        k = self.k_proj(x)\n        v = self.v_proj(x)\n"
            "        cos, sin = position_embeddings\n"
            "        q, k = self.rotary_emb(positions, q, k)\n"
            "        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)\n"
            "        return out\n",
        ),
        Example(
            "from torch import nn\n\n\ndef apply_rotary_pos_emb(q, k, cos, sin):\n"
            "    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin\n\n\n"
            "class Attn(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.head_dim = config.head_dim\n"
            "        self.q_proj = nn.Linear(config.hidden_size, "
            "config.num_heads * self.head_dim)\n"
            "        self.k_proj = nn.Linear(config.hidden_size, "
            "config.num_kv_heads * self.head_dim)\n"
            "        self.v_proj = nn.Linear(config.hidden_size, "
            "config.num_kv_heads * self.head_dim)\n\n"
            "    def forward(self, x, position_embeddings):\n        q = self.q_proj(x)\n"
            "        k = self.k_proj(x)\n        v = self.v_proj(x)\n"
            "        cos, sin = position_embeddings\n"
            "        q, k = apply_rotary_pos_emb(q, k, cos, sin)\n"
            "        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)\n"
            "        return out\n",
            "from torch import nn\n\n\ndef apply_rotary_pos_emb(q, k, cos, sin):\n"
            "    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin\n\n\n"
            "class Attn(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
            "        self.head_dim = config.head_dim\n"
            "        self.q_proj = nn.Linear(config.hidden_size, "
            "config.num_heads * self.head_dim)\n"
            "        self.k_proj = nn.Linear(config.hidden_size, "
            "config.num_kv_heads * self.head_dim)\n"
            "        self.v_proj = nn.Linear(config.hidden_size, "
            "config.num_kv_heads * self.head_dim)\n"
            "        self.rotary_emb = get_rope(self.head_dim, "
            "max_position=config.max_position_embeddings, rope_parameters=config.rope_parameters, "
            "is_neox_style=True)\n\n    def forward(self, x, position_embeddings):\n"
            "        q = self.q_proj(x)\n        k = self.k_proj(x)\n        v = self.v_proj(x)\n"
            "        cos, sin = position_embeddings\n"
            "        q, k = self.rotary_emb(positions, q, k)\n"
            "        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)\n"
            "        return out\n",
        ),
        Example(
            "from torch import nn\n\n\nclass ARotaryEmbedding(nn.Module):\n"
            "    def __init__(self, config):\n        super().__init__()\n"
            "        self.inv_freq = 1.0 / config.rope_theta\n\n"
            "    def forward(self, x, position_ids):\n        return self.inv_freq\n\n\n"
            "class AModel(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.rotary_emb = ARotaryEmbedding(config)\n"
            "        self.norm = nn.LayerNorm(config.hidden_size)\n",
            "from torch import nn\n\n\nclass ARotaryEmbedding(nn.Module):\n"
            "    def __init__(self, config):\n        super().__init__()\n"
            "        self.inv_freq = 1.0 / config.rope_theta\n\n"
            "    def forward(self, x, position_ids):\n        return self.inv_freq\n\n\n"
            "class AModel(nn.Module):\n    def __init__(self, config):\n"
            "        super().__init__()\n        self.norm = nn.LayerNorm(config.hidden_size)\n",
        ),
        Example(  # one rotary table per layer type (gemma3): each layer takes its own
            'from torch import nn\n'
            '\n'
            '\n'
            'def apply_rotary_pos_emb(q, k, cos, sin):\n'
            '    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin\n'
            '\n'
            '\n'
            'class ARotaryEmbedding(nn.Module):\n'
            '    def __init__(self, config):\n'
            '        super().__init__()\n'
            '        for layer_type in set(config.layer_types):\n'
            '            base = config.rope_parameters[layer_type]["rope_theta"]\n'
            '            setattr(self, f"{layer_type}_inv_freq", 1.0 / base)\n'
            '\n'
            '    def forward(self, x, position_ids, layer_type):\n'
            '        return x\n'
            '\n'
            '\n'
            'class Attn(nn.Module):\n'
            '    def __init__(self, config, layer_idx):\n'
            '        super().__init__()\n'
            '        self.head_dim = config.head_dim\n'
            '        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n'
            '        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n'
            '        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n'
            '\n'
            '    def forward(self, x, position_embeddings):\n'
            '        q = self.q_proj(x)\n'
            '        k = self.k_proj(x)\n'
            '        v = self.v_proj(x)\n'
            '        cos, sin = position_embeddings\n'
            '        q, k = apply_rotary_pos_emb(q, k, cos, sin)\n'
            '        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)\n'
            '        return out\n',
            'from torch import nn\n'
            '\n'
            '\n'
            'def apply_rotary_pos_emb(q, k, cos, sin):\n'
            '    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin\n'
            '\n'
            '\n'
            'class ARotaryEmbedding(nn.Module):\n'
            '    def __init__(self, config):\n'
            '        super().__init__()\n'
            '        for layer_type in set(config.layer_types):\n'
            '            base = config.rope_parameters[layer_type]["rope_theta"]\n'
            '            setattr(self, f"{layer_type}_inv_freq", 1.0 / base)\n'
            '\n'
            '    def forward(self, x, position_ids, layer_type):\n'
            '        return x\n'
            '\n'
            '\n'
            'class Attn(nn.Module):\n'
            '    def __init__(self, config, layer_idx):\n'
            '        super().__init__()\n'
            '        self.head_dim = config.head_dim\n'
            '        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n'
            '        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n'
            '        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim)\n'
            '        self.rotary_emb = get_rope(self.head_dim, max_position=config.max_position_embeddings, rope_parameters=config.rope_parameters[config.layer_types[layer_idx]], is_neox_style=True)\n'
            '\n'
            '    def forward(self, x, position_embeddings):\n'
            '        q = self.q_proj(x)\n'
            '        k = self.k_proj(x)\n'
            '        v = self.v_proj(x)\n'
            '        cos, sin = position_embeddings\n'
            '        q, k = self.rotary_emb(positions, q, k)\n'
            '        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)\n'
            '        return out\n',
        ),
    ]

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        attn = self.plan.attention(cls or "")
        if not self.kept(cls) or len(self.scope) != 1:
            return updated
        if attn and attn.rope and updated.name.value == "__init__":
            neox = "True" if attn.rope == "neox" else "False"
            params = "config.rope_parameters"
            if _rope_by_layer_type(self.ctx):
                # one rotary table per layer type (gemma3: local and global theta): this layer's
                if "layer_idx" not in param_names(updated):
                    raise PorterError(
                        "rotary parameters chosen per layer type, but the attention is not told its "
                        "layer (no layer_idx parameter)", file=self.ctx.idx.path,
                        line=self.ctx.idx.classes[cls].line, construct=f"{cls}.__init__",
                        rule=self.name)
                params = "config.rope_parameters[config.layer_types[layer_idx]]"
            if attn.rope_theta:  # a table built in the source (PT151): its base and rotated dims
                params = f'{{"rope_theta": {attn.rope_theta}, "rope_dim": {attn.rope_dim}}}'
            st = cst.parse_statement(
                f"self.rotary_emb = {self.ctx.use('get_rope')}({attn.head_dim}, "
                f"max_position=config.max_position_embeddings, "
                f"rope_parameters={params}, is_neox_style={neox})\n"
            )
            self.mark(f"{cls}.__init__")
            return append_to_init(self._without_own_rotary(cls, original, updated), [st])
        if attn and attn.rope and updated.name.value == "forward" and self._own_rotary(cls):
            return self._without_own_rotary(cls, original, updated)
        if updated.name.value == "__init__":
            # drop `self.rotary_emb = XRotaryEmbedding(...)` in other classes
            info = self.ctx.idx.classes.get(cls or "")
            body = []
            for st in updated.body.body:
                rotary_attr = None
                if info:
                    for attr, sub in info.submodules.items():
                        if sub.ctor in self.plan.rotary_classes and is_assign_of(st, attr):
                            rotary_attr = attr
                if rotary_attr:
                    self.ctx.removed_attrs.add((cls, rotary_attr))
                    self.mark(f"{cls}.__init__")
                    continue
                body.append(st)
            return updated.with_changes(body=updated.body.with_changes(body=body))
        return updated

    def _own_rotary(self, cls: str | None) -> set[str]:
        """The attention's own rotary modules (remote code's `self.rotary_emb = RotaryEmbedding(
        head_dim)` in the attention, called for its cos/sin cache)."""
        info = self.ctx.idx.classes.get(cls or "")
        return {a for a, sub in info.submodules.items() if sub.ctor in self.plan.rotary_classes} if info else set()

    def _without_own_rotary(self, cls: str | None, original: cst.FunctionDef, fn: cst.FunctionDef) -> cst.FunctionDef:
        """FN without the attention's own rotary module: its construction in __init__, and in
        forward the statements binding its cos/sin (their names go with the HF plumbing, PT011).
        Read in ORIGINAL, the function before this rule's own `self.rotary_emb(positions, q, k)`."""
        own = self._own_rotary(cls)
        body = []
        for st, was in zip(fn.body.body, original.body.body):
            if _guarded_build(was, own):  # `if config.rotary: self.rotary_emb = XRotaryEmbedding(...)`
                continue
            assign = was.body[0] if isinstance(was, cst.SimpleStatementLine) and len(was.body) == 1 else None
            if isinstance(assign, cst.Assign) and m.matches(assign.value, m.Call(  # the engine's call PT151 wrote
                    func=m.Attribute(value=m.Name("self")), args=[m.Arg(m.Name("positions")), m.Arg(), m.Arg()])):
                body.append(st)
                continue
            if isinstance(assign, cst.Assign) and (
                    any(is_assign_of(was, a) for a in own) or any(
                        m.matches(c.func, m.Attribute(value=m.Name("self"), attr=m.Name(a)))
                        for c in findall(assign.value, m.Call()) for a in own)):
                if fn.name.value == "forward":
                    names = {n for t in assign.targets for n in assigned_names(t.target)}
                    self.ctx.extra_taint.setdefault(cls or "", set()).update(names)
                continue
            body.append(st)
        if len(body) == len(fn.body.body):
            return fn
        self.mark(f"{cls}.{fn.name.value}")
        return fn.with_changes(body=fn.body.with_changes(body=body))

    def visit_FunctionDef(self, node):
        self._parts: set[str] = set()  # names now bound to the first part of a last-axis split
        return super().visit_FunctionDef(node)

    def visit_Assign(self, node: cst.Assign) -> None:
        if not hasattr(self, "_parts"):  # an assignment outside any function (module or class level)
            self._parts = set()
        for t in node.targets:
            pairs = [(t.target, node.value)]
            if isinstance(t.target, cst.Tuple) and isinstance(node.value, cst.Tuple) \
                    and len(t.target.elements) == len(node.value.elements):
                pairs = [(a.value, b.value) for a, b in zip(t.target.elements, node.value.elements)]
            for target, value in pairs:
                part = last_axis_part(value)
                names = set(assigned_names(target))
                if part is not None and part[1] == "rot" and isinstance(target, cst.Name):
                    self._parts |= names
                else:
                    self._parts -= names

    def leave_Call(self, original, updated):
        attn = self.plan.attention(self.current_class or "")
        if attn and attn.rope_helper and m.matches(updated.func, m.Name(attn.rope_helper)):
            q, k = updated.args[0].value, updated.args[1].value
            if any(last_axis_part(x) is not None or (isinstance(x, cst.Name) and x.value in getattr(self, "_parts", ()))
                   for x in (q, k)):
                # the engine's rotary takes whole flat q/k and splits each head itself (PT019 folds the split
                # it recognises); a slice handed to it would be rotated as if it were whole heads
                raise self.ctx.idx.error(
                    "rotary applied to a slice of each head (partial rotary) that no rule folds into the "
                    "engine's rotary on whole q/k", original, construct=f"{self.current_class}.{self.current_function}",
                    rule=self.name)
            self.ctx.needs_positions.add(attn.cls)
            if _rotates_one(self.ctx.idx.functions.get(attn.rope_helper)):  # `x = apply(x, cos, sin)` (Gemma-4)
                return cst.parse_expression("self.rotary_emb(positions, X, None)[0]").with_changes(value=cst.Call(
                    func=cst.parse_expression("self.rotary_emb"),
                    args=[cst.Arg(cst.Name("positions")), cst.Arg(q), cst.Arg(cst.Name("None"))]))
            return cst.parse_expression("self.rotary_emb(positions, Q, K)").with_changes(
                args=[cst.Arg(cst.Name("positions")), cst.Arg(q), cst.Arg(k)]
            )
        return updated


def _rotates_one(helper: cst.FunctionDef | None) -> bool:
    """The rotary helper rotates one tensor per call: every `return` hands back one expression, not a
    pair (Gemma-4's `apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim)`). The engine's rotary then
    rotates that tensor alone: `self.rotary_emb(positions, x, None)[0]`."""
    returns = findall(helper, m.Return()) if helper is not None else []
    return bool(returns) and not any(isinstance(r.value, cst.Tuple) or r.value is None for r in returns)  # type: ignore[attr-defined]
