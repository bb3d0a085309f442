"""PT037 yarn-mscale: the rule `YarnMscale`; its `why` says what it rewrites and why."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.analysis.cstutil import findall
from porter.passes.base import Example, Rule

# transformers' rotary utilities (modeling_rope_utils) whose computation the port writes itself:
# the helper's name as HF's modeling files import it
HELPER = "yarn_apply_mscale"

_SRC = '''
def {helper}(rope_parameters, scaling):
    """The attention's softmax scale with YaRN's `mscale_all_dim` folded in (mscale squared, as
    DeepSeek's reference multiplies it into q @ k^T), for a rotary other than the default one."""
    if rope_parameters.get("rope_type", "default") != "default":
        mscale_all_dim = rope_parameters.get("mscale_all_dim", 0)
        if mscale_all_dim:
            mscale = {get_mscale}(rope_parameters["factor"], mscale_all_dim)
            scaling = scaling * mscale * mscale
    return scaling
'''


class YarnMscale(Rule):
    code = "PT037"
    name = "yarn-mscale"
    descends = False
    why = (
        "Latent-attention models fold YaRN's `mscale_all_dim` into their softmax scale. transformers "
        "5.25 moved that helper out of the modeling files into its rotary utilities "
        "(`from ...modeling_rope_utils import yarn_apply_mscale`), which a port cannot import. The "
        "port gets the helper written here instead, on the engine's `yarn_get_mscale` (the same "
        "0.1·m·ln(s)+1 for s > 1, else 1): the same scale, the same float operations in the same order, "
        "as the modeling files of 5.24 and before computed in their own copy of it."
    )
    examples = [
        Example(  # (PT001 dropped the import of the helper from ...modeling_rope_utils)
            "class Attn(nn.Module):\n"
            "    def __init__(self, config):\n"
            "        self.scaling = yarn_apply_mscale(config.rope_parameters, self.head_dim ** (-0.5))\n",
            "class Attn(nn.Module):\n    def __init__(self, config):\n"
            "        self.scaling = yarn_apply_mscale(config.rope_parameters, self.head_dim ** (-0.5))\n"
            + _SRC.format(helper=HELPER, get_mscale="yarn_get_mscale").replace("\ndef", "\n\ndef", 1),
            seed={"removed_names": {HELPER}},
        ),
    ]

    @classmethod
    def applies(cls, ctx) -> bool:
        return HELPER in ctx.removed_names

    def leave_Module(self, original, updated):
        if not findall(updated, m.Call(func=m.Name(HELPER))):
            return updated
        self.ctx.removed_names.discard(HELPER)
        src = _SRC.format(helper=HELPER, get_mscale=self.ctx.use("yarn_get_mscale"))
        self.mark(HELPER)
        helper = [st.with_changes(leading_lines=[cst.EmptyLine(), cst.EmptyLine()]) if i == 0 else st
                  for i, st in enumerate(cst.parse_module(src).body)]
        return updated.with_changes(body=[*updated.body, *helper])
