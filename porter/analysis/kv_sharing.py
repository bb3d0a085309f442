"""KV sharing across layers, found by dataflow: an attention whose keys and values, in the layers
where a test holds, are another layer's, handed in through a forward argument instead of projected
(gemma3n / gemma4's shared KV layers):

    if self.is_kv_shared_layer:                      # the reading arm (its test: `shared_when`)
        key_states, value_states = shared[self.layer_type]  # read under `read_key`
    else:
        key_states = self.k_proj(x) ...
    ...
    if self.store_full_length_kv:                    # the writing layers (`write_when`)
        shared[self.layer_type] = key_states, value_states  # written under `write_key`

The argument (`param`) is recognised as the forward parameter that a two-name tuple is unpacked
from by subscript, in one arm of an `if`; what the other layers store into it is read from the
subscript assignment of that same parameter whose value is the tuple of the two names. Nothing here
depends on spelling: the names are the ones the source uses."""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import code, findall, param_names


@dataclass(frozen=True)
class KvSharing:
    param: str  # the forward parameter carrying the other layer's k/v
    names: tuple[str, str]  # the locals the reading arm binds (k, v)
    shared_when: str  # true in the layers that read another layer's k/v
    read_key: str  # the key they read under (an expression of the layer)
    write_when: str | None  # true in the layers whose k/v the readers take (None: no writer found)
    write_key: str | None  # the key those layers store under
    reader: cst.If  # the `if` whose one arm reads
    writer: cst.If | None  # the `if` storing k/v (the whole statement goes in a port)
    read_stmt: cst.Assign


def _unpack_from(param: set[str]) -> m.Assign:
    return m.Assign(targets=[m.AssignTarget(m.Tuple(elements=[m.Element(m.Name()), m.Element(m.Name())]))],
                    value=m.Subscript(value=m.Name(m.MatchIfTrue(lambda n: n in param))))


def _arm_reads(block: cst.BaseSuite, params: set[str]) -> cst.Assign | None:
    hits = [n for st in getattr(block, "body", ()) for n in findall(st, _unpack_from(params))]
    return hits[0] if len(hits) == 1 else None  # type: ignore[return-value]


def kv_sharing(fwd: cst.FunctionDef, ignore: set[str] = frozenset()) -> KvSharing | None:  # type: ignore[assignment]
    """The KV sharing of an attention forward, or None when no arm reads k/v from an argument."""
    params = set(param_names(fwd)) - {"self"} - set(ignore)
    for node in findall(fwd, m.If()):
        assert isinstance(node, cst.If)
        read, when = _arm_reads(node.body, params), code(node.test)
        if read is None and isinstance(node.orelse, cst.Else):
            read, when = _arm_reads(node.orelse.body, params), f"not ({code(node.test)})"
        if read is None:
            continue
        sub = read.value
        assert isinstance(sub, cst.Subscript) and isinstance(sub.value, cst.Name)
        param = sub.value.value
        names = tuple(e.value.value for e in read.targets[0].target.elements)  # type: ignore[attr-defined]
        writer, write_when, write_key = _writer(fwd, param)
        return KvSharing(param, names, when, _key(sub), write_when, write_key, node, writer, read)  # type: ignore[arg-type]
    return None


def _key(sub: cst.Subscript) -> str:
    return code(sub.slice[0].slice.value) if len(sub.slice) == 1 else code(sub)  # type: ignore[attr-defined]


def _writer(fwd: cst.FunctionDef, param: str) -> tuple[cst.If | None, str | None, str | None]:
    """`if COND: param[KEY] = k, v` -> (the if, COND, KEY)."""
    store = m.Assign(targets=[m.AssignTarget(m.Subscript(value=m.Name(param)))], value=m.Tuple())
    for node in findall(fwd, m.If(orelse=None)):
        assert isinstance(node, cst.If)
        body = getattr(node.body, "body", ())
        hits = [n for st in body for n in findall(st, store)]
        if len(hits) == 1 and len(body) == 1:
            sub = hits[0].targets[0].target  # type: ignore[attr-defined]
            return node, code(node.test), _key(sub)
    return None, None, None
