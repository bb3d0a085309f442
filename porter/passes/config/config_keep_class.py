"""PT142 config-keep-class: the rule `ConfigKeepClass`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import findall
from porter.passes.base import Example
from porter.passes.config._common import ConfigRule


class ConfigKeepClass(ConfigRule):
    code = "PT142"
    name = "config-keep-class"
    why = (
        "A configuration module often defines several configs (a multimodal model's vision and "
        "audio configs beside its text config). The port needs only the config the causal LM "
        "takes and the in-module classes it derives from; the rest is dropped with the imports "
        "only it used, so the shipped module does not depend on helpers the port never uses."
    )
    examples = [
        Example(
            "from x import Helper, PreTrainedConfig\n\n\nclass BConfig(PreTrainedConfig):\n"
            "    sub = Helper()\n\n\nclass AConfig(PreTrainedConfig):\n    model_type = \"a\"\n\n\n"
            "__all__ = [\"BConfig\", \"AConfig\"]\n",
            "from x import PreTrainedConfig\n\n\nclass AConfig(PreTrainedConfig):\n"
            "    model_type = \"a\"\n\n\n__all__ = [\"AConfig\"]\n",
        )
    ]
    descends = False

    def leave_Module(self, original, updated):
        body = []
        for st in updated.body:
            if isinstance(st, cst.ClassDef) and st.name.value not in self.cctx.keep:
                self.changed = True
                continue
            if m.matches(st, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(
                    target=m.Name("__all__"))])])):
                st = cst.parse_statement(f"__all__ = {sorted(self.cctx.keep)!r}".replace("'", '"')
                                         ).with_changes(leading_lines=st.leading_lines)
            body.append(st)
        used: set[str] = set()
        for st in body:
            if not m.matches(st, m.SimpleStatementLine(body=[m.ImportFrom() | m.Import()])):
                used |= {n.value for n in findall(st, m.Name())}
        out = []
        for st in body:
            if m.matches(st, m.SimpleStatementLine(body=[m.ImportFrom()])):
                imp = st.body[0]
                if not isinstance(imp.names, cst.ImportStar):
                    names = [a for a in imp.names
                             if (a.asname.name.value if a.asname else cst.Module([]).code_for_node(a.name)) in used]
                    if not names:
                        self.changed = True
                        continue
                    if len(names) != len(imp.names):
                        names[-1] = names[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
                        st = st.with_changes(body=[imp.with_changes(names=names)])
            out.append(st)
        return updated.with_changes(body=out)

