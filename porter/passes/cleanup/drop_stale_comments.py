"""PT312 drop-stale-comments: the rule `DropStaleComments`; its `why` says what it rewrites and why."""

from __future__ import annotations

import re

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import findall
from porter.passes.base import Example, Rule

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # reads a comment's words; the comment is removed as a node
_SHAPE = re.compile(r"\[[^\[\]]*,[^\[\]]*\]")  # a bracketed list of dimensions: `[batch_size, seq_length, 3 x hidden]`

_BEFORE = (
    "def build_mask(attention_mask, past_key_values):\n    batch_size, seq_length = attention_mask.shape\n"
    "    return attention_mask[:, None] + past_key_values.get_seq_length()\n\n\n"
    "class AAttention(nn.Module):\n    def forward(self, hidden_states, positions):\n"
    "        # hidden_states: [batch_size, seq_length, hidden_size]\n"
    "        # Self Attention.\n"
    "        qkv, _ = self.qkv_proj(hidden_states)  # [batch_size, seq_length, 3 x hidden_size]\n"
    "        # once we are past the sliding window we always use the shared states,\n"
    "        # even when past_key_values is not None\n"
    "        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)\n"
    "        # the engine's attention finds its KV cache itself\n"
    "        return self.attn(q, k, v)  # hidden_size wide\n"
)
_AFTER = (
    "def build_mask(attention_mask, past_key_values):\n    batch_size, seq_length = attention_mask.shape\n"
    "    return attention_mask[:, None] + past_key_values.get_seq_length()\n\n\n"
    "class AAttention(nn.Module):\n    def forward(self, hidden_states, positions):\n"
    "        # Self Attention.\n"
    "        qkv, _ = self.qkv_proj(hidden_states)\n"
    "        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)\n"
    "        # the engine's attention finds its KV cache itself\n"
    "        return self.attn(q, k, v)  # hidden_size wide\n"
)


def _ends(line: cst.EmptyLine) -> bool:
    return line.comment is None or line.comment.value.rstrip().endswith((".", "!", "?", "]"))


class DropStaleComments(Rule):
    code = "PT312"
    name = "drop-stale-comments"
    why = (
        "HF's comments describe HF's state: `# [batch_size, seq_length, 3 x hidden_size]` beside a projection "
        "that now sees `[num_tokens, hidden]`, `# ... even when past_key_values is not None` above code that no "
        "longer has a cache argument. A comment in a kept class goes when it names HF-only state the port no "
        "longer has: a snake-case name (a code name, not prose) that no code of the port reads and that is "
        "either an identifier of the HF file among HF's plumbing inputs or helpers (rules/hf_strip.yaml: "
        "`attention_mask`, `past_key_values`, `cache_position`, `create_causal_mask`) or the first dimension "
        "of a bracketed shape (`[batch_size, seq_length, ...]`: the batch the engine's flat tokens do "
        "not have). With a stale line of a comment block go the lines of the same sentence (a line continues the "
        "one before unless that ends with `.`, `!`, `?` or a shape's `]`); every other comment stays, and the "
        "causal LM's methods (porter's templates wrote them) are not read."
    )
    examples = [Example(_BEFORE, _AFTER)]

    @classmethod
    def applies(cls, ctx) -> bool:
        return bool(ctx.idx.identifiers)

    def rewrite(self, module: cst.Module) -> cst.Module:
        self.port_names = self._port_names(module)
        self.hf_only = self.ctx.table.strip_params | self.ctx.table.hf_only_callables
        return super().rewrite(module)

    def _port_names(self, module: cst.Module) -> set[str]:
        """The names the port's code reads: its kept classes, and the module's functions they call."""
        functions = {st.name.value: st for st in module.body if isinstance(st, cst.FunctionDef)}
        names: set[str] = set()
        todo = [st for st in module.body if isinstance(st, cst.ClassDef) and self.kept(st.name.value)]
        seen: set[str] = set()
        while todo:
            node = todo.pop()
            found = {n.value for n in findall(node, m.Name())}  # type: ignore[attr-defined]
            names |= found
            for name in (found & set(functions)) - seen:
                seen.add(name)
                todo.append(functions[name])
        return names

    def _gone(self, word: str) -> bool:
        """A code name (snake case, not prose) no code of the port reads."""
        return "_" in word.strip("_") and word not in self.port_names

    def stale(self, comment: str) -> bool:
        if any(w in self.hf_only and w in self.ctx.idx.identifiers and self._gone(w) for w in _WORD.findall(comment)):
            return True
        # a shape whose first dimension is one the port does not have (the batch the flat tokens lost)
        return any(self._gone(next(iter(_WORD.findall(shape)), "")) for shape in _SHAPE.findall(comment))

    def _lines(self, lines) -> list[cst.EmptyLine]:
        """The leading lines without the stale comment lines and the lines of the same sentences: a
        comment line continues the one before it unless that one ends a sentence (or a shape)."""
        lines = list(lines)
        drop: set[int] = set()
        for i, line in enumerate(lines):
            if line.comment is None or not self.stale(line.comment.value):
                continue
            first = i
            while first > 0 and lines[first - 1].comment is not None and not _ends(lines[first - 1]):
                first -= 1
            last = i
            while not _ends(lines[last]) and last + 1 < len(lines) and lines[last + 1].comment is not None:
                last += 1
            drop |= set(range(first, last + 1))
        return [line for i, line in enumerate(lines) if i not in drop]

    def _clean(self, node):
        # (the causal LM's methods are the port's own: porter's templates wrote them)
        if not self.kept(self.current_class) or self.current_class == self.plan.causal_lm or len(self.scope) < 2:
            return node
        changes = {}
        lines = self._lines(node.leading_lines)
        if len(lines) != len(node.leading_lines):
            changes["leading_lines"] = lines
        trailing = getattr(node, "trailing_whitespace", None)
        if trailing is not None and trailing.comment is not None and self.stale(trailing.comment.value):
            changes["trailing_whitespace"] = trailing.with_changes(comment=None, whitespace=cst.SimpleWhitespace(""))
        return node.with_changes(**changes) if changes else node

    def leave_SimpleStatementLine(self, original, updated):
        return self._clean(updated)

    def leave_If(self, original, updated):
        return self._clean(updated)

    def leave_For(self, original, updated):
        return self._clean(updated)

    def leave_While(self, original, updated):
        return self._clean(updated)

    def leave_With(self, original, updated):
        return self._clean(updated)

    def leave_Try(self, original, updated):
        return self._clean(updated)
