"""PT038 mask-positions: the rule `MaskPositions`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import assigned_names, code, findall, names_in, param_names, self_attr
from porter.passes.base import Example, Rule

# casts that keep the values: `m.long()`, `x.type_as(m)`, `x.to(torch.long)`, `x.int()`
_CASTS = {"long", "int", "type_as", "to"}


def _uncast(e: cst.BaseExpression) -> cst.BaseExpression:
    while True:
        if isinstance(e, cst.Call) and isinstance(e.func, cst.Attribute) and e.func.attr.value in _CASTS:
            e = e.func.value
        else:
            return e


def _cumsum_of(e: cst.BaseExpression, masks: set[str]) -> bool:
    """`torch.cumsum(m, dim=1)` / `m.cumsum(-1)` of a mask name (2-D: dim 1 is its last)."""
    e = _uncast(e)
    if not isinstance(e, cst.Call):
        return False
    if m.matches(e.func, m.Attribute(value=m.Name("torch"), attr=m.Name("cumsum"))) and e.args:
        src, rest = _uncast(e.args[0].value), e.args[1:]
    elif m.matches(e.func, m.Attribute(attr=m.Name("cumsum"))):
        src, rest = _uncast(e.func.value), e.args  # type: ignore[attr-defined]
    else:
        return False
    dims = [a.value for a in rest if a.keyword is None or a.keyword.value == "dim"]
    return isinstance(src, cst.Name) and src.value in masks and len(dims) == 1 and \
        m.matches(dims[0], m.Integer("1") | m.UnaryOperation(operator=m.Minus(), expression=m.Integer("1")))


def _rank_minus_one(e: cst.BaseExpression, masks: set[str], cums: set[str]) -> bool:
    """`c * m - 1` (either order of the product, casts anywhere) with c the mask's cumulative sum."""
    e = _uncast(e)
    if not m.matches(e, m.BinaryOperation(operator=m.Subtract(), right=m.Integer("1"))):
        return False
    prod = _uncast(e.left)  # type: ignore[attr-defined]
    if not m.matches(prod, m.BinaryOperation(operator=m.Multiply())):
        return False
    for c, k in ((prod.left, prod.right), (prod.right, prod.left)):  # type: ignore[attr-defined]
        k = _uncast(k)
        c_ok = _cumsum_of(c, masks) or (isinstance(_uncast(c), cst.Name) and _uncast(c).value in cums)  # type: ignore[attr-defined]
        if c_ok and isinstance(k, cst.Name) and k.value in masks:
            return True
    return False


def mask_positions(fn: cst.FunctionDef) -> tuple[str, set[str], list[int]] | None:
    """(the positions' name, the parameters only they read, the indices of the statements computing
    them) when FN computes its positions from a 2-D padding mask parameter: `p = cumsum(mask, dim=1)
    * mask - 1`, then `p = p[:, past:]` cut by a parameter (the cache's length)."""
    params = [p for p in param_names(fn) if p != "self"]
    masks: set[str] = set()
    cums: set[str] = set()
    casts: dict[int, str] = {}  # `attention_mask = attention_mask.long()`: a mask's if a cumsum reads it
    pos: str | None = None
    past: str | None = None
    steps: list[int] = []
    for i, st in enumerate(fn.body.body):
        if not m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())])])):
            continue
        small = st.body[0]  # type: ignore[attr-defined]
        t, v = small.targets[0].target.value, small.value
        if t in params and v is not _uncast(v) and m.matches(_uncast(v), m.Name(t)):
            casts[i] = t
        elif _cumsum_of(v, set(params)):
            masks |= names_in(v) & set(params)
            cums.add(t)
            steps.append(i)
        elif _rank_minus_one(v, set(params), cums):
            masks |= names_in(v) & set(params)
            pos = t
            steps.append(i)
        elif pos is not None and m.matches(v, m.Subscript(value=m.Name(pos), slice=[
                m.SubscriptElement(m.Slice(lower=None, upper=None)),
                m.SubscriptElement(m.Slice(lower=m.Name(m.MatchIfTrue(lambda n: n in params)), upper=None))])):
            past = v.slice[1].slice.lower.value  # type: ignore[attr-defined]
            steps.append(i)
    if pos is None or past is None or len(masks) != 1:
        return None
    steps = sorted(steps + [i for i, t in casts.items() if t in masks])
    rest = [st for i, st in enumerate(fn.body.body) if i not in steps]
    read = set().union(set(), *(names_in(st) for st in rest))
    if read & (masks | {past} | cums):
        return None  # the mask or the cut serve something else too
    return pos, masks | {past}, steps


class MaskPositions(Rule):
    code = "PT038"
    name = "mask-positions"
    why = (
        "transformers 4.x position embeddings of OPT and BioGPT take no positions: they compute them "
        "from the 2-D padding mask, `p = cumsum(mask, dim=1) * mask - 1`, cut by the cache length "
        "(`p[:, past:]`). For a sequence without padding (the engine never pads) the mask covers the "
        "cached and the new tokens with ones, so the cut positions are past, past+1, ..., the new "
        "tokens' absolute positions: the engine's `positions`. The module's forward takes `positions` "
        "instead of the mask and the cache length (the statements computing them go), its callers "
        "pass `positions=positions` instead, and PT031 threads `positions` down to them."
    )
    examples = [
        Example(
            "class Pos(nn.Embedding):\n"
            "    def forward(self, attention_mask, past_key_values_length=0):\n"
            "        attention_mask = attention_mask.long()\n"
            "        positions = (torch.cumsum(attention_mask, dim=1).type_as(attention_mask) * attention_mask).long() - 1\n"
            "        positions = positions[:, past_key_values_length:]\n"
            "        return super().forward(positions + self.offset)\n\n\n"
            "class Decoder(nn.Module):\n"
            "    def __init__(self, config):\n        self.embed_positions = Pos(config.n, config.d)\n\n"
            "    def forward(self, x, attention_mask, past_key_values_length):\n"
            "        return x + self.embed_positions(attention_mask, past_key_values_length)\n",
            "class Pos(nn.Embedding):\n"
            "    def forward(self, positions: torch.Tensor):\n"
            "        return super().forward(positions + self.offset)\n\n\n"
            "class Decoder(nn.Module):\n"
            "    def __init__(self, config):\n        self.embed_positions = Pos(config.n, config.d)\n\n"
            "    def forward(self, x, attention_mask, past_key_values_length):\n"
            "        return x + self.embed_positions(positions=positions)\n",
        ),
        # must leave unchanged: the mask's cumulative sum is not cut by the cache length
        Example(
            "class Pos(nn.Embedding):\n    def forward(self, attention_mask):\n"
            "        positions = torch.cumsum(attention_mask, dim=1) * attention_mask - 1\n"
            "        return super().forward(positions)\n",
            "class Pos(nn.Embedding):\n    def forward(self, attention_mask):\n"
            "        positions = torch.cumsum(attention_mask, dim=1) * attention_mask - 1\n"
            "        return super().forward(positions)\n",
        ),
    ]

    @classmethod
    def applies(cls, ctx) -> bool:
        return "cumsum" in ctx.idx.identifiers

    @staticmethod
    def find(fn: cst.FunctionDef) -> tuple[str, set[str], list[int]] | None:
        """(the positions' name, the parameters only they read, the statements computing them)
        when the forward FN computes the engine's positions itself (PT039 finds them otherwise)."""
        return mask_positions(fn)

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self._found: dict[str, tuple[str, set[str], list[int], list[str]]] = {}
        for name in self.plan.classes:
            info = ctx.idx.classes.get(name)
            fwd = info.method("forward") if info else None
            found = self.find(fwd) if fwd is not None else None
            if found is not None:
                self._found[name] = (*found, [p for p in param_names(fwd) if p != "self"])  # type: ignore[arg-type]

    def leave_If(self, original, updated):
        """`if config.X: self.pos = A(...) else: self.pos = B(...)` in __init__, A's positions found
        and B's not: B's forward builds positions the port does not reproduce (its callers now pass
        the engine's), so that arm refuses at load, with the reason (never a silent approximation)."""
        if self.current_function != "__init__" or not isinstance(updated.orelse, cst.Else):
            return updated
        arms = [updated.body, updated.orelse.body]
        built = [self._builds(arm) for arm in arms]
        if None in built or built[0][0] != built[1][0] or \
                [b[1] in self._found for b in built].count(True) != 1:  # type: ignore[index]
            return updated
        which = next(i for i, b in enumerate(built) if b[1] not in self._found)  # type: ignore[index]
        test = code(updated.test)
        when = f"`{test}`" if which == 0 else f"not `{test}`"
        msg = (f"porter: this port does not build {built[which][1]} (chosen when {when}): its forward "  # type: ignore[index]
               "computes positions the port does not reproduce; the port reads the engine's positions")
        guard = cst.parse_statement(f"raise ValueError({msg!r})")
        arm = arms[which].with_changes(body=[guard])
        self.mark(f"{self.current_class}.__init__")
        if which == 0:
            return updated.with_changes(body=arm)
        return updated.with_changes(orelse=updated.orelse.with_changes(body=arm))

    def _builds(self, arm: cst.BaseSuite) -> tuple[str, str] | None:
        """(attribute, class) when ARM is one `self.attr = Cls(...)` of a file class."""
        body = getattr(arm, "body", [])
        if len(body) != 1 or not m.matches(body[0], m.SimpleStatementLine(body=[m.Assign(
                targets=[m.AssignTarget(m.Attribute(value=m.Name("self")))], value=m.Call(func=m.Name()))])):
            return None
        a = body[0].body[0]  # type: ignore[attr-defined]
        cls = a.value.func.value
        return (a.targets[0].target.attr.value, cls) if cls in self.ctx.idx.classes else None

    def _callee(self, call: cst.Call) -> str | None:
        info = self.ctx.idx.classes.get(self.current_class or "")
        sub = info.submodules.get(self_attr(call.func) or "") if info else None
        return sub.ctor if sub is not None and sub.ctor in self._found else None

    def visit_FunctionDef(self, node):
        if len(self.scope) == 1 and node.name.value == "forward":
            calls = [c for c in findall(node, m.Call()) if self._callee(c) is not None]  # type: ignore[arg-type]
            bound = {n for a in findall(node.body, m.AssignTarget()) for n in assigned_names(a.target)}  # type: ignore[attr-defined]
            # a local already named `positions` (BioGPT binds its position embeddings so) is renamed
            self._clash = "positions" in bound and bool(calls) and self.current_class not in self._found
            self._keywords = {id(a.keyword) for a in findall(node, m.Arg(keyword=m.Name()))} | {
                id(a.attr) for a in findall(node, m.Attribute())}
        return super().visit_FunctionDef(node)

    def leave_Name(self, original, updated):
        if getattr(self, "_clash", False) and "forward" in self.scope[1:] and updated.value == "positions" \
                and id(original) not in self._keywords:
            return updated.with_changes(value="positions_embeds")
        return updated

    def leave_Call(self, original, updated):
        callee = self._callee(original) if "forward" in self.scope[1:] else None
        if callee is None:
            return updated
        _, gone, _, params = self._found[callee]
        pos = [a for a in updated.args if a.keyword is None and not a.star]
        kept = [a for i, a in enumerate(pos) if i < len(params) and params[i] not in gone] + [
            a for a in updated.args if a.keyword is not None and a.keyword.value not in gone]
        if any(a.star for a in updated.args):
            return updated
        kept = [a.with_changes(comma=cst.MaybeSentinel.DEFAULT) for a in kept]
        kept.append(cst.Arg(cst.Name("positions"), keyword=cst.Name("positions"),
                            equal=cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace(""))))
        return updated.with_changes(args=kept)

    def leave_FunctionDef(self, original, updated):
        cls = self.current_class
        super().leave_FunctionDef(original, updated)
        self._clash = False
        if cls not in self._found or len(self.scope) != 1 or updated.name.value != "forward":
            return updated
        found = self.find(original)
        if found is None:
            return updated
        pos, gone, steps = found
        body = [st for i, st in enumerate(updated.body.body) if i not in steps]

        class _Rename(cst.CSTTransformer):
            def leave_Name(self, o, u):
                return u.with_changes(value="positions") if u.value == pos else u

        if pos != "positions":
            body = [st.visit(_Rename()) for st in body]
        params = [p for p in updated.params.params if p.name.value not in gone]
        at = 1 if params and params[0].name.value == "self" else 0
        params.insert(at, cst.Param(cst.Name("positions"), annotation=cst.Annotation(cst.parse_expression("torch.Tensor"))))
        params = [p.with_changes(comma=cst.MaybeSentinel.DEFAULT) for p in params]
        self.ctx.needs_positions.add(cls)  # type: ignore[arg-type]
        return updated.with_changes(params=updated.params.with_changes(params=params),
                                    body=updated.body.with_changes(body=body))
