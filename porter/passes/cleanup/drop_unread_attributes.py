"""PT310 drop-unread-attributes: the rule `DropUnreadAttributes`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import findall, self_attr
from porter.passes.base import Example, Rule
from porter.passes.cleanup._reads import attribute_uses, named

# builtins that compute a value from their arguments and change nothing (Python's semantics, not a
# list of models' names): `getattr(config, "head_dim", d)`, `int(...)`, `min(...)`
_PURE_BUILTINS = frozenset({"getattr", "hasattr", "isinstance", "int", "float", "bool", "str", "min", "max",
                            "len", "abs", "round", "tuple", "list", "dict", "set", "frozenset"})
# scalar annotations: a parameter so typed (`layer_idx: int`) is never a module the assignment registers
_SCALARS = frozenset({"int", "float", "bool", "str"})
# what the engine reads on any module by its name (the config every vLLM module carries; the quantization
# config quantized layers look up), kept wherever it is set
_ENGINE_READ = frozenset({"config", "quant_config"})
_SELF_ASSIGN = m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Attribute(value=m.Name("self"),
                                                                                         attr=m.Name()))])
                                           | m.AnnAssign(target=m.Attribute(value=m.Name("self"), attr=m.Name()))])

_BEFORE = (
    "from torch import nn\n\n\n"
    "class AAttention(nn.Module):\n    def __init__(self, config, layer_idx: int):\n        super().__init__()\n"
    "        self.config = config\n        self.layer_idx = layer_idx\n"
    "        self.head_dim = getattr(config, 'head_dim', config.hidden_size // config.num_attention_heads)\n"
    "        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads\n"
    "        self.attention_dropout = config.attention_dropout\n        self.is_causal = True\n"
    "        self.o_proj = RowParallelLinear(config.hidden_size, config.hidden_size)\n\n"
    "    def forward(self, x):\n        return self.o_proj(x * self.head_dim)\n\n\n"
    "class AModel(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.padding_idx = config.pad_token_id\n        self.width = config.hidden_size\n"
    "        self.double = 2 * self.width\n"
    "        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)\n"
    "        self.layers = nn.ModuleList([AAttention(config, i) for i in range(config.num_hidden_layers)])\n\n\n"
    "class AForCausalLM(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.model = AModel(config)\n"
    "        self.vocab_size = config.vocab_size\n"
)
_AFTER = (
    "from torch import nn\n\n\n"
    "class AAttention(nn.Module):\n    def __init__(self, config, layer_idx: int):\n        super().__init__()\n"
    "        self.config = config\n"
    "        self.head_dim = getattr(config, 'head_dim', config.hidden_size // config.num_attention_heads)\n"
    "        self.o_proj = RowParallelLinear(config.hidden_size, config.hidden_size)\n\n"
    "    def forward(self, x):\n        return self.o_proj(x * self.head_dim)\n\n\n"
    "class AModel(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)\n"
    "        self.layers = nn.ModuleList([AAttention(config, i) for i in range(config.num_hidden_layers)])\n\n\n"
    "class AForCausalLM(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.model = AModel(config)\n"
    "        self.vocab_size = config.vocab_size\n"
)
_READ_ELSEWHERE = (  # must leave unchanged: another class reads it through the object, or by its name
    "class AAttention(nn.Module):\n    def __init__(self, config, layer_idx: int):\n        super().__init__()\n"
    "        self.layer_idx = layer_idx\n        self.sliding = config.sliding_window\n\n\n"
    "class ALayer(nn.Module):\n    def __init__(self, config, layer_idx: int):\n        super().__init__()\n"
    "        self.self_attn = AAttention(config, layer_idx)\n\n"
    "    def forward(self, x):\n        if getattr(self.self_attn, 'sliding', None):\n            return x\n"
    "        return x * self.self_attn.layer_idx\n"
)
_MODULE_ARG = (  # must leave unchanged: a parameter that may hold a module (its assignment registers it)
    "class ALayer(nn.Module):\n    def __init__(self, config, embed_tokens=None):\n        super().__init__()\n"
    "        self.embed_tokens = embed_tokens\n        self.alias = self.embed_tokens.weight\n"
)


_FED_LOCAL = (  # a local only the dropped attribute read goes with it (GPT-NeoX's partial_rotary_factor)
    "from torch import nn\n\n\n"
    "class AAttention(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        factor = config.rope_parameters.get('partial_rotary_factor', 1.0)\n"
    "        self.rotary_ndims = int(config.head_dim * factor)\n"
    "        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)\n\n"
    "    def forward(self, x):\n        return self.o_proj(x)\n"
)
_FED_LOCAL_AFTER = (
    "from torch import nn\n\n\n"
    "class AAttention(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
    "        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)\n\n"
    "    def forward(self, x):\n        return self.o_proj(x)\n"
)


class DropUnreadAttributes(Rule):
    descends = False
    code = "PT310"
    name = "drop-unread-attributes"
    why = (
        "HF's modules keep values their own plumbing read: the attention's `is_causal`, `attention_dropout` and "
        "`num_key_value_groups` (for HF's attention functions and `repeat_kv`), the model's `padding_idx` (for "
        "`nn.Embedding`), `layer_idx` (for the cache). Once that plumbing is gone nothing reads them, and vLLM's "
        "own files do not set them. An `self.X = <value>` statement of a kept class's `__init__` goes when its "
        "value has no effect (names, attributes, constants, arithmetic, pure builtins; a parameter only when its "
        "annotation or default shows a scalar, never a module the assignment would register) and no `.X` or "
        "string `\"X\"` occurs anywhere else in the module (the class, its subclasses, or another class reading "
        "it through the object: `getattr(self.self_attn, 'X')`), repeated while one removal frees another. The "
        "causal LM class (the engine's interface reads its attributes) and `config`/`quant_config` (which the "
        "engine reads on any module) are kept, as is everything in a module that reads attributes by a computed "
        "name (`getattr(self, name)`, `vars(self)`)."
    )
    examples = [Example(_BEFORE, _AFTER), Example(_READ_ELSEWHERE, _READ_ELSEWHERE),
                Example(_MODULE_ARG, _MODULE_ARG), Example(_FED_LOCAL, _FED_LOCAL_AFTER)]

    def leave_Module(self, original, updated):
        if self._dynamic(updated):
            return updated
        while True:
            dead = self._dead(updated)
            if not dead:
                return updated
            updated = updated.with_changes(body=[self._strip(st, dead) if isinstance(st, cst.ClassDef) and
                                                 st.name.value in dead else st for st in updated.body])

    @staticmethod
    def _dynamic(module: cst.Module) -> bool:
        """The module reads attributes by a computed name: nothing can be shown unread."""
        computed = m.Call(func=m.Name("getattr") | m.Name("hasattr"),
                          args=[m.Arg(m.Name("self")), m.Arg(~m.SimpleString()), m.ZeroOrMore()])
        return bool(findall(module, computed | m.Call(func=m.Name("vars"))) or findall(
            module, m.Attribute(attr=m.Name("__dict__"))))

    def _dead(self, module: cst.Module) -> dict[str, set[str]]:
        """Per kept class, the attributes its `__init__` sets to an effect-free value that nothing reads."""
        candidates: dict[str, list[tuple[str, cst.Attribute]]] = {}
        for cls in module.body:
            if not isinstance(cls, cst.ClassDef) or not self.kept(cls.name.value) or cls.name.value == self.plan.causal_lm:
                continue
            init = next((f for f in cls.body.body if isinstance(f, cst.FunctionDef) and f.name.value == "__init__"), None)
            if init is None:
                continue
            env = _Env(init)
            for st in init.body.body:
                if m.matches(st, _SELF_ASSIGN):
                    small = st.body[0]  # type: ignore[attr-defined]
                    target = small.targets[0].target if isinstance(small, cst.Assign) else small.target
                    attr = self_attr(target)
                    if attr not in _ENGINE_READ and small.value is not None and env.plain(small.value):
                        candidates.setdefault(attr, []).append((cls.name.value, target))  # type: ignore[arg-type]
        if not candidates:
            return {}
        strings = named(module, set(self.plan.classes))
        uses = attribute_uses(module, self.ctx.idx, set(self.plan.classes))
        dead: dict[str, set[str]] = {}
        for attr, sites in candidates.items():
            # every `.X` of the module is one of these assignments: nothing reads X
            if attr not in strings and uses.get(attr, 0) == len(sites):
                for cls_name, _ in sites:
                    dead.setdefault(cls_name, set()).add(attr)
        return dead

    def _strip(self, cls: cst.ClassDef, dead: dict[str, set[str]]) -> cst.ClassDef:
        gone = dead[cls.name.value]
        body = []
        for f in cls.body.body:
            if isinstance(f, cst.FunctionDef) and f.name.value == "__init__":
                kept = [st for st in f.body.body if not (m.matches(st, _SELF_ASSIGN) and self._target(st) in gone)]
                kept = self._unfed_locals(f, kept)
                if len(kept) != len(f.body.body):
                    self.mark(f"{cls.name.value}.__init__")
                    f = f.with_changes(body=f.body.with_changes(body=kept or [cst.SimpleStatementLine([cst.Pass()])]))
            body.append(f)
        return cls.with_changes(body=cls.body.with_changes(body=body))

    @staticmethod
    def _unfed_locals(init: cst.FunctionDef, kept: list[cst.BaseStatement]) -> list[cst.BaseStatement]:
        """KEPT without the plain locals only the dropped assignments read (GPT-NeoX's
        `partial_rotary_factor = ...`, read by `self.rotary_ndims = ...` alone)."""
        env = _Env(init)
        ids = {id(st) for st in kept}
        removed = [st for st in init.body.body if id(st) not in ids]
        fed = {n.value for st in removed for n in findall(st, m.Name())}  # type: ignore[attr-defined]
        local = m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())])])
        bound = [n.value for t in findall(init, m.AssignTarget() | m.AugAssign() | m.AnnAssign() | m.For())  # type: ignore[attr-defined]
                 for n in findall(getattr(t, "target"), m.Name())]
        while True:
            reads: dict[str, int] = {}
            for st in kept:
                for n in findall(st, m.Name()):
                    reads[n.value] = reads.get(n.value, 0) + 1  # type: ignore[attr-defined]
            dead = [st for st in kept if m.matches(st, local) and (name := st.body[0].targets[0].target.value) in fed  # type: ignore[attr-defined]
                    and reads.get(name, 0) == 1 and bound.count(name) == 1 and env.read_only(st.body[0].value)]  # type: ignore[attr-defined]
            if not dead:
                return kept
            kept = [st for st in kept if not any(st is x for x in dead)]

    @staticmethod
    def _target(st: cst.SimpleStatementLine) -> str | None:
        small = st.body[0]
        return self_attr(small.targets[0].target if isinstance(small, cst.Assign) else small.target)  # type: ignore[attr-defined]


class _Env:
    """What one `__init__` binds (its parameters, locals and `self.` attributes), to tell a plain value (a
    number, a string, a flag, a config field: never a module or a parameter the assignment would register,
    and computed without effects) from the rest."""

    def __init__(self, init: cst.FunctionDef) -> None:
        self.params = {p.name.value: p for p in [*init.params.params, *init.params.kwonly_params]}
        self.bound: dict[str, list[cst.BaseExpression | None]] = {}
        for st in init.body.body:
            for small in getattr(st, "body", []) if isinstance(st, cst.SimpleStatementLine) else []:
                if isinstance(small, cst.Assign):
                    for t in small.targets:
                        key = self._key(t.target)
                        if key is not None:
                            self.bound.setdefault(key, []).append(small.value)
                        for n in findall(t.target, m.Name()):  # unpacking / item targets: not followed
                            self.bound.setdefault(n.value, []).append(None)  # type: ignore[attr-defined]
                elif isinstance(small, (cst.AnnAssign, cst.AugAssign)):
                    key = self._key(small.target)
                    if key is not None:
                        self.bound.setdefault(key, []).append(None)
            if not isinstance(st, cst.SimpleStatementLine):  # bound in a block: not followed
                for n in findall(st, m.AssignTarget() | m.For() | m.WithItem()):
                    for name in findall(n, m.Name()):
                        self.bound.setdefault(name.value, []).append(None)  # type: ignore[attr-defined]
        self.seen: set[str] = set()

    @staticmethod
    def _key(target: cst.BaseExpression) -> str | None:
        if isinstance(target, cst.Name):
            return target.value
        attr = self_attr(target)
        return None if attr is None else f"self.{attr}"

    def plain(self, value: cst.BaseExpression | None) -> bool:
        if value is None:
            return False
        if isinstance(value, (cst.Integer, cst.Float, cst.Imaginary, cst.SimpleString, cst.ConcatenatedString)):
            return True
        if isinstance(value, cst.FormattedString):
            return all(self.effect_free(p.expression) for p in value.parts
                       if isinstance(p, cst.FormattedStringExpression))
        if isinstance(value, cst.BinaryOperation):  # numbers, flags, tensors: a module has no `+`
            return self.effect_free(value.left) and self.effect_free(value.right)
        if isinstance(value, cst.Comparison):
            return self.effect_free(value.left) and all(self.effect_free(c.comparator) for c in value.comparisons)
        if isinstance(value, cst.UnaryOperation):
            return self.effect_free(value.expression)
        if isinstance(value, cst.BooleanOperation):
            return self.plain(value.left) and self.plain(value.right)
        if isinstance(value, cst.IfExp):
            return self.effect_free(value.test) and self.plain(value.body) and self.plain(value.orelse)
        if isinstance(value, (cst.Tuple, cst.List, cst.Set)):  # a container is never registered
            return all(self.effect_free(e.value) for e in value.elements)
        if isinstance(value, cst.Call):
            name = value.func.value if isinstance(value.func, cst.Name) else None
            if name in {"hasattr", "isinstance"} | (_PURE_BUILTINS - {"getattr", "tuple", "list", "dict", "set",
                                                                          "frozenset"}):
                return all(self.effect_free(a.value) for a in value.args)
            if name == "getattr" and len(value.args) >= 2:
                return self.config_field(value.args[0].value) and all(self.plain(a.value) for a in value.args[2:])
            return name in {"tuple", "list", "dict", "set", "frozenset"} and all(
                self.effect_free(a.value) for a in value.args)
        if isinstance(value, cst.Name):
            if value.value in {"True", "False", "None"}:
                return True
            if value.value in self.params:
                return self._scalar_param(value.value)
            return self._bound_plain(value.value)
        if isinstance(value, (cst.Attribute, cst.Subscript)):
            if self.config_field(value):
                return True
            return self_attr(value) is not None and self._bound_plain(f"self.{self_attr(value)}")
        return False

    def effect_free(self, value: cst.BaseExpression) -> bool:
        """Computed without effects (calls of the pure builtins only), whatever it is."""
        if findall(value, m.Lambda() | m.Await() | m.Yield() | m.NamedExpr()):
            return False
        return all(m.matches(c.func, m.Name()) and c.func.value in _PURE_BUILTINS  # type: ignore[attr-defined]
                   for c in findall(value, m.Call()))

    def read_only(self, value: cst.BaseExpression) -> bool:
        """Effect-free, or a read of a config field's dict (`config.rope_parameters.get("x", 1.0)`)."""
        if m.matches(value, m.Call(func=m.Attribute(attr=m.Name("get")))) and \
                self.config_field(value.func.value):  # type: ignore[attr-defined]
            return all(self.effect_free(a.value) for a in value.args)  # type: ignore[attr-defined]
        return self.effect_free(value)

    def config_field(self, value: cst.BaseExpression) -> bool:
        """`config.x`, `config.attn_config.y`, `config.layer_types[i]`, `self.config.z`: a field of the HF
        config (a plain object, never a module), read without effects."""
        root = value
        while isinstance(root, (cst.Attribute, cst.Subscript)):
            if isinstance(root, cst.Subscript) and not self.effect_free(root):
                return False
            root = root.value
        if root is value:
            return False
        if m.matches(root, m.Name("self")):
            return m.matches(value, m.Attribute(value=m.Attribute(value=m.Name("self"), attr=m.Name("config")))) or \
                (isinstance(value, cst.Subscript) and self.config_field(value.value))
        return isinstance(root, cst.Name) and self._is_config(root.value)

    def _is_config(self, name: str) -> bool:
        if name in self.params:
            p = self.params[name]
            return name == "config" or (p.annotation is not None and any(
                n.value.endswith("Config") for n in findall(p.annotation.annotation, m.Name())))  # type: ignore[attr-defined]
        values = self.bound.get(name, [])
        return bool(values) and all(v is not None and self.config_field(v) for v in values)

    def _bound_plain(self, key: str) -> bool:
        values = self.bound.get(key, [])
        if not values or key in self.seen:
            return False
        self.seen.add(key)
        try:
            return all(self.plain(v) for v in values)
        finally:
            self.seen.discard(key)

    def _scalar_param(self, name: str) -> bool:
        """A parameter annotated as a scalar (`layer_idx: int`, `int | None`) or defaulting to a number, a
        string or a bool."""
        p = self.params[name]
        if p.annotation is not None:
            parts = {n.value for n in findall(p.annotation.annotation, m.Name())}  # type: ignore[attr-defined]
            if parts and parts <= _SCALARS | {"None", "Optional"} and parts & _SCALARS:
                return True
        return m.matches(p.default, m.Integer() | m.Float() | m.SimpleString() | m.Name("True") | m.Name("False"))
