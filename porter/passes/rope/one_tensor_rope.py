"""Rotary applied one tensor per call, from a sinusoidal table: one engine rotary call on q and k."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import assigned_names, findall, names_in, param_names, self_call_attr
from porter.passes.base import Example, Rule


def _targets(st: cst.CSTNode) -> set[str]:
    out: set[str] = set()
    for a in findall(st, m.AssignTarget()):
        out.update(assigned_names(a.target))  # type: ignore[attr-defined]
    return out


class OneTensorRope(Rule):
    descend_methods = frozenset()
    code = "PT151"
    name = "one-tensor-rope"
    why = (
        "GPT-J builds a sinusoidal table in `__init__` (`self.embed_positions = nn.Buffer(...)`), "
        "gathers sin/cos rows by position in forward, and rotates q and k one call each "
        "(`k_rot = apply_rotary_pos_emb(k_rot, sin, cos)`), on a slice of each head when only "
        "`rotary_dim` dims rotate (`if self.rotary_dim is not None: ... torch.cat([k_rot, k_pass])`). "
        "The engine's `get_rope` does all of it on flat q/k from `positions`: the sin/cos statements, the "
        "slicing and the rotation block become `q, k = self.rotary_emb(positions, q, k)`, and a helper "
        "method only they called goes. The table's base and the rotated dims (planned from the source) "
        "go into `rope_parameters` (PT020)."
    )
    examples = [
        Example(
            "from torch import nn\n\n\ndef make_table(n, dim):\n"
            "    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2) / dim))\n"
            "    x = torch.arange(n)[:, None] * inv\n"
            "    return torch.cat((torch.sin(x), torch.cos(x)), dim=1)\n\n\n"
            "def apply_rotary_pos_emb(t, sin, cos):\n"
            "    return t * cos + rotate_every_two(t) * sin\n\n\n"
            "def rotate_every_two(x):\n"
            "    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)\n\n\n"
            "class Attn(nn.Module):\n"
            "    def __init__(self, config):\n"
            "        super().__init__()\n        self.head_dim = config.head_dim\n"
            "        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n"
            "        self.k_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n"
            "        self.v_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n"
            "        self.table = nn.Buffer(make_table(config.max_position_embeddings, self.head_dim))\n\n"
            "    def _rows(self, position_ids):\n        return self.table[position_ids]\n\n"
            "    def forward(self, x, positions):\n"
            "        q = self.q_proj(x)\n        k = self.k_proj(x)\n        v = self.v_proj(x)\n"
            "        sincos = self._rows(positions).to(k.dtype)\n"
            "        sin, cos = torch.split(sincos, sincos.shape[-1] // 2, dim=-1)\n"
            "        k = apply_rotary_pos_emb(k, sin, cos)\n"
            "        q = apply_rotary_pos_emb(q, sin, cos)\n"
            "        out, _ = attention_interface(self, q, k, v, None)\n        return out\n",
            "from torch import nn\n\n\ndef make_table(n, dim):\n"
            "    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2) / dim))\n"
            "    x = torch.arange(n)[:, None] * inv\n"
            "    return torch.cat((torch.sin(x), torch.cos(x)), dim=1)\n\n\n"
            "def apply_rotary_pos_emb(t, sin, cos):\n"
            "    return t * cos + rotate_every_two(t) * sin\n\n\n"
            "def rotate_every_two(x):\n"
            "    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)\n\n\n"
            "class Attn(nn.Module):\n"
            "    def __init__(self, config):\n"
            "        super().__init__()\n        self.head_dim = config.head_dim\n"
            "        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n"
            "        self.k_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n"
            "        self.v_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim)\n"
            "        self.table = nn.Buffer(make_table(config.max_position_embeddings, self.head_dim))\n\n"
            "    def forward(self, x, positions):\n"
            "        q = self.q_proj(x)\n        k = self.k_proj(x)\n        v = self.v_proj(x)\n"
            "        q, k = self.rotary_emb(positions, q, k)\n"
            "        out, _ = attention_interface(self, q, k, v, None)\n        return out\n",
        )
    ]

    @classmethod
    def applies(cls, ctx) -> bool:
        # a helper rotating one tensor per call (`x, sin, cos`), not remote code's cos/sin cache
        # module, whose table is also read from the source (porter/analysis/rotary_module.py)
        return any(a.rope_theta and a.rope_helper in ctx.idx.functions
                   and len(param_names(ctx.idx.functions[a.rope_helper])) < 4 for a in ctx.plan.attentions)

    def leave_ClassDef(self, original, updated):
        attn = self.plan.attention(updated.name.value)
        if len(self.scope) != 1 or attn is None or not attn.rope_theta or not attn.rope_helper:
            return super().leave_ClassDef(original, updated)
        methods = {st.name.value: st for st in updated.body.body if isinstance(st, cst.FunctionDef)}
        fwd = methods.get("forward")
        if fwd is None:
            return super().leave_ClassDef(original, updated)
        new_fwd, removed_calls = self._forward(fwd, attn.rope_helper)
        if new_fwd is None:
            return super().leave_ClassDef(original, updated)
        self.ctx.needs_positions.add(attn.cls)
        body = []
        for st in updated.body.body:
            if st is fwd:
                st = new_fwd
            body.append(st)
        still = {self_call_attr(c) for st in body for c in findall(st, m.Call())}
        gone = removed_calls - still
        for name in sorted(gone):
            self.mark(f"{attn.cls}.{name}")
        body = [st for st in body if not (isinstance(st, cst.FunctionDef) and st.name.value in gone)]
        self.mark(f"{attn.cls}.forward")
        return super().leave_ClassDef(original, updated.with_changes(body=updated.body.with_changes(body=body)))

    def _forward(self, fwd: cst.FunctionDef, helper: str):
        stmts = list(fwd.body.body)
        is_helper = m.Call(func=m.Name(helper))
        rot = [i for i, st in enumerate(stmts) if findall(st, is_helper)]
        if not rot:
            return None, set()
        rotated_block = set(rot)
        written = set().union(*(_targets(stmts[i]) for i in rot))
        calls = [c for i in rot for c in findall(stmts[i], is_helper)]
        tables = set().union(*(names_in(a.value) for c in calls for a in c.args[1:]))  # type: ignore[attr-defined]
        # q and k: the names the attention call reads that the rotation rebinds, in its order
        attn_call = next((c for c in findall(fwd, m.Call(func=m.Name("attention_interface")))), None)
        if attn_call is None:
            return None, set()
        order = [n for a in attn_call.args[1:3] for n in names_in(a.value)]  # type: ignore[attr-defined]
        q_k = [n for n in order if n in written]
        if len(q_k) != 2:
            return None, set()
        keep_out = written | set(q_k)
        # the sin/cos statements: backwards from the tables the helper reads
        need, drop = set(tables), set()
        for i in range(min(rot) - 1, -1, -1):
            st = stmts[i]
            t = _targets(st)
            if t and t <= need and not findall(st, is_helper):
                drop.add(i)
                need |= names_in(st) - keep_out - {"self"}
        removed_calls = {a for i in drop for c in findall(stmts[i], m.Call()) if (a := self_call_attr(c))}
        call = cst.parse_statement(f"{q_k[0]}, {q_k[1]} = self.rotary_emb(positions, {q_k[0]}, {q_k[1]})\n")
        out = []
        for i, st in enumerate(stmts):
            if i in drop:
                continue
            if i in rotated_block:
                if i == min(rot):
                    out.append(call.with_changes(leading_lines=st.leading_lines))
                continue
            out.append(st)
        return fwd.with_changes(body=fwd.body.with_changes(body=out)), removed_calls
